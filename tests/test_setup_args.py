"""Stage setups: every field reachable from its command, recipes from configs/, flags over recipes, and a
stage run from Python alone."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from minivlm.cli import main, parse
from minivlm.config import TrainConfig
from minivlm.errors import MiniVLMError
from minivlm.setup_args import CONFIGS, build, load_recipe, recipe_names, setup_from_args, setup_from_recipe
from minivlm.tasks.finetune import FinetuneSetup
from minivlm.tasks.pretrain import PretrainSetup
from minivlm.vision.train import DETECTOR_RECIPE, DetectorSetup

REQUIRED = {"train-detector": [], "pretrain": ["--data", "w", "--features", "f", "--out", "o"],
            "finetune": ["--task", "vqa", "--data", "w", "--features", "f", "--out", "o"]}
STAGES = {"train-detector": DetectorSetup, "pretrain": PretrainSetup, "finetune": FinetuneSetup}
# A value unlike every stage's default, per TrainConfig field, as typed and as parsed.
TRAIN_FLAGS = {"epochs": ("7", 7), "max_steps": ("11", 11), "batch_size": ("3", 3), "lr": ("0.123", 0.123),
               "optimizer": ("sgd", "sgd"), "momentum": ("0.5", 0.5), "weight_decay": ("0.25", 0.25),
               "schedule": ("constant", "constant"), "warmup_steps": ("9", 9), "grad_clip": ("none", None),
               "amp": (None, False), "cpu_amp": (None, True), "num_workers": ("3", 3), "seed": ("5", 5), "log_every": ("2", 2),
               "ckpt_every": ("13", 13), "eval_every": ("17", 17), "accumulate": ("4", 4)}


def setup(command: str, *argv: str):
    _, args = parse(command, [*REQUIRED[command], *argv])
    return setup_from_args(STAGES[command], args)


@pytest.mark.parametrize("command", list(STAGES))
def test_every_train_config_field_is_a_flag_of_every_stage(command):
    assert set(TRAIN_FLAGS) == {f.name for f in dataclasses.fields(TrainConfig)}
    for name, (typed, parsed) in TRAIN_FLAGS.items():
        flag = "--no-amp" if name == "amp" else f"--{name.replace('_', '-')}"
        argv = [flag] if typed is None else [flag, typed]
        if name == "num_workers":
            argv = ["--workers", typed]
        assert getattr(setup(command, *argv).train, name) == parsed, (command, name)


@pytest.mark.parametrize("command", list(STAGES))
def test_every_setup_field_has_a_documented_flag(command):
    import argparse
    import typing

    from minivlm.setup_args import _plain, add_setup_arguments

    parser = argparse.ArgumentParser()
    add_setup_arguments(parser, STAGES[command])
    helps = {a.dest: a.help for a in parser._actions}

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(_plain(hints[f.name])):
                walk(_plain(hints[f.name]), prefix + f.name + ".")
            else:
                assert helps.get(prefix + f.name), (command, prefix + f.name)

    walk(STAGES[command])


def test_stage_defaults_are_todays():
    assert setup("train-detector").train == DETECTOR_RECIPE
    assert setup("pretrain").train == TrainConfig(batch_size=32, lr=4e-4)
    vqa = setup("finetune")
    assert (vqa.train.epochs, vqa.train.lr, vqa.train.batch_size) == (10, 2e-4, 32)
    assert (vqa.eval_examples, vqa.num_answers, vqa.pretrained) == (500, 3129, None)
    # today's names of flags that differ from their fields
    s = setup("finetune", "--steps", "4", "--mask-prob", "0.5", "--eval-split", "a", "--eval-split", "b",
              "--pretrained", "none")
    assert (s.train.max_steps, s.caption_mask_prob, s.eval_splits, s.pretrained) == (4, 0.5, ["a", "b"], None)
    p = setup("pretrain", "--no-captions", "--no-vqa", "--itm-weight", "5", "--itm-on-questions")
    assert (p.captions, p.vqa, p.task.itm_weight, p.task.itm_on_questions) == (False, False, 5.0, True)
    d = setup("train-detector", "--attribute-loss-weight", "0.25", "--eval-images", "4", "--eval-split", "none")
    assert (d.attribute_loss_weight, d.eval_images, d.eval_split) == (0.25, 4, "none")


def test_recipes_load_and_flags_override_them():
    assert {"oscar-caption", "oscar-vqa", "oscar-nlvr2", "oscar-retrieval"} <= set(recipe_names("finetune"))
    assert {"tee-objects365", "tee-vg"} <= set(recipe_names("detector"))
    s = setup("finetune", "--recipe", "oscar-vqa", "--lr", "1e-4")
    assert (s.task, s.train.epochs, s.train.weight_decay, s.train.lr) == ("vqa", 25, 0.05, 1e-4)
    s = setup("pretrain", "--recipe", "vl-pretrain", "--batch-size", "8")
    assert (s.preset, s.train.epochs, s.train.batch_size, s.train.lr) == ("minilm", 100, 8, 4e-4)
    d = setup("train-detector", "--recipe", "tee-vg")
    assert (d.preset, d.train.optimizer, d.train.lr, d.train.warmup_steps) == ("tee0", "sgd", 0.2, 30)
    # every recipe of configs/ builds its stage (the required paths given)
    paths = dict(data="w", features="f", out="o")
    for stage, cls in (("detector", DetectorSetup), ("pretrain", PretrainSetup), ("finetune", FinetuneSetup)):
        for name in recipe_names(stage):
            assert isinstance(setup_from_recipe(cls, name, **({} if cls is DetectorSetup else paths)), cls)
    assert "source" not in load_recipe("finetune", "oscar-vqa")  # the citation is for readers only
    assert (CONFIGS / "demo.toml").is_file()


def test_bad_setups_are_one_line_errors(capsys):
    with pytest.raises(MiniVLMError, match="unknown finetune recipe 'nope'"):
        setup("finetune", "--recipe", "nope")
    with pytest.raises(MiniVLMError, match="--data .*required"):
        build(PretrainSetup, {"out": "o"})
    with pytest.raises(MiniVLMError, match="no field 'lr'"):
        build(FinetuneSetup, {"task": "vqa", "data": "w", "features": "f", "out": "o", "lr": 1})
    assert main(["finetune", *REQUIRED["finetune"], "--recipe", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("minivlm finetune: error: unknown finetune recipe") and "\n" not in err
    assert main(["pretrain", "--out", "o", "--data", "w"]) == 1  # no region source
    assert "--features STORE or --detector" in capsys.readouterr().err


def test_pretrain_then_finetune_from_python_alone(tmp_path):
    from minivlm import FinetuneSetup as FS, PretrainSetup as PS, finetune, pretrain
    from minivlm.data.oracle import write_oracle_store
    from minivlm.data.synthetic import generate_world

    world, store = tmp_path / "world", tmp_path / "oracle"
    generate_world(world, images=16, seed=0, nlvr2_pairs=0, workers=1)
    write_oracle_store(world, store, region_dim=32)
    tiny = TrainConfig(epochs=1, max_steps=2, batch_size=4, lr=1e-3, log_every=1)
    last = pretrain(PS(data=world, features=store, out=tmp_path / "pre", preset="bert-demo", eval_examples=8,
                       train=tiny))
    assert "loss" in last and (tmp_path / "pre" / "model" / "config.json").is_file()
    metrics = finetune(FS(task="vqa", data=world, features=store, out=tmp_path / "vqa",
                          pretrained=tmp_path / "pre" / "model", max_eval=8, progress=False, train=tiny))
    assert metrics["train"]["step"] == 2
    assert json.loads((tmp_path / "vqa" / "train_config.json").read_text())["max_steps"] == 2
    assert Path(tmp_path / "vqa" / "metrics.json").is_file()
