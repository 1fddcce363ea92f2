"""One checkpoint folder format for every stage: detector, pre-training, fine-tuned task, whole model.

    config.json        {"kind": "detector" | "pretrain" | "task" | "model", "version": 1,
                        "minivlm": "<package version>", "config": {... the kind's fields ...}}
    model.safetensors  the model's own `state_dict()` (PyTorch module names); loading never unpickles
    vocab.txt          pretrain, task, model: the WordPiece vocabulary
    answers.txt        a VQA task, and a model with VQA: the answer set, one per line

The "config" of each kind, and the module its weights belong to:

    detector  DetectorSpec {"tee", "class_names", "attribute_names"}      TEE
    pretrain  {"bert": BertConfig, ...provenance}                         PretrainModel
    task      TaskSpec {"task", "bert", ...provenance}                    the task model (VQAModel, ...)
    model     {"detector": DetectorSpec, "tasks": {name: TaskSpec}}       MiniVLM ("detector.*", "tasks.<name>.*")

Readers ask for the kinds they accept and read the kind from config.json; nothing is inferred from
weight names. One external format is read, never written: "huggingface-bert", a text BERT/MiniLM folder
from Hugging Face (config.json with model_type "bert"), used to initialise the transformer.
A folder of the earlier formats (no "kind") is refused with one line naming what it is and the fix:
`python -m minivlm.checkpoint upgrade FOLDER` rewrites it in place.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minivlm import __version__
from minivlm.config import BertConfig, PaperCost, TEEConfig, from_dict, to_dict
from minivlm.errors import DataFormatError, MiniVLMError
from minivlm.io import atomic_path, load_weights, read_json, read_lines, save_weights, write_json, write_lines
from minivlm.tasks.data import TASKS

VERSION = 1
KINDS = ("detector", "pretrain", "task", "model")
HF_BERT = "huggingface-bert"
CONFIG, WEIGHTS, VOCAB, ANSWERS = "config.json", "model.safetensors", "vocab.txt", "answers.txt"

# What re-creates each kind, for the messages that point at it.
_STAGE = {"detector": "minivlm train-detector", "pretrain": "minivlm pretrain", "task": "minivlm finetune",
          "model": "MiniVLM.assemble(...).save_pretrained(...)"}


# ---------------------------------------------------------------------------------------------- typed parts


def tee_config(data: dict) -> TEEConfig:
    """The one place a TEEConfig is read back from JSON."""
    cfg = from_dict(TEEConfig, {k: v for k, v in data.items() if k != "paper"})
    cfg.paper = from_dict(PaperCost, data.get("paper") or {})
    cfg.pretrained_backbone = None  # the weights are in the folder
    return cfg


@dataclass
class DetectorSpec:
    tee: TEEConfig
    class_names: list[str]
    attribute_names: list[str]

    def to_json(self) -> dict:
        return {"tee": to_dict(dataclasses.replace(self.tee, pretrained_backbone=None)),
                "class_names": list(self.class_names), "attribute_names": list(self.attribute_names)}

    @classmethod
    def from_json(cls, data: Any, path: Path, where: str = "config") -> "DetectorSpec":
        tee = tee_config(_field(path, data, "tee", dict, where))
        names = _field(path, data, "class_names", list, where)
        attrs = _field(path, data, "attribute_names", list, where)
        for key, value, n in (("class_names", names, tee.num_classes), ("attribute_names", attrs, tee.num_attributes)):
            if len(value) != n:
                raise DataFormatError(path, f"{where}.{key}: {len(value)} names for a detector with {n}")
        return cls(tee, [str(s) for s in names], [str(s) for s in attrs])


@dataclass
class TaskSpec:
    task: str
    bert: BertConfig
    extra: dict = field(default_factory=dict)  # provenance and task settings (train_split, num_answers, ...)

    def to_json(self) -> dict:
        return {"task": self.task, "bert": to_dict(self.bert), **self.extra}

    @classmethod
    def from_json(cls, data: Any, path: Path, where: str = "config") -> "TaskSpec":
        task = _field(path, data, "task", str, where)
        if task not in TASKS:
            raise DataFormatError(path, f"{where}.task: unknown task {task!r} (expected one of {', '.join(TASKS)})")
        bert = from_dict(BertConfig, _field(path, data, "bert", dict, where))
        return cls(task, bert, {k: v for k, v in data.items() if k not in ("task", "bert")})


# ---------------------------------------------------------------------------------------------- folders


@dataclass
class Checkpoint:
    folder: Path
    kind: str  # one of KINDS, or HF_BERT
    config: dict  # the kind's "config" object (for HF_BERT: its whole config.json)
    version: int = VERSION

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS

    @property
    def vocab(self) -> Path | None:
        path = self.folder / VOCAB
        return path if path.is_file() else None

    def answers(self) -> list[str]:
        return read_lines(self.folder / ANSWERS)

    def detector_spec(self) -> DetectorSpec:
        if self.kind == "model":
            return DetectorSpec.from_json(_field(self.config_path, self.config, "detector", dict, "config"),
                                          self.config_path, "config.detector")
        return DetectorSpec.from_json(self.config, self.config_path)

    def task_spec(self) -> TaskSpec:
        return TaskSpec.from_json(self.config, self.config_path)

    def task_specs(self) -> dict[str, TaskSpec]:
        """The task parts of a model folder."""
        tasks = _field(self.config_path, self.config, "tasks", dict, "config")
        specs = {name: TaskSpec.from_json(t, self.config_path, f"config.tasks.{name}") for name, t in tasks.items()}
        for name, spec in specs.items():
            if spec.task != name:
                raise DataFormatError(self.config_path, f"config.tasks.{name}: holds a {spec.task} task")
        return specs

    def bert_config(self) -> BertConfig:
        """The transformer's config of a pretrain, task or Hugging Face BERT folder."""
        if self.kind == HF_BERT:
            return _hf_bert_config(self.config, self.config_path)
        if self.kind not in ("pretrain", "task"):
            raise DataFormatError(self.config_path, f"a {self.kind} folder has no single transformer config")
        return from_dict(BertConfig, _field(self.config_path, self.config, "bert", dict, "config"))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return load_weights(self.weights)


def load_state_strict(model: torch.nn.Module, path: Path) -> None:
    """safetensors weights that must fit the model exactly; a mismatch names the file and the tensors."""
    state = load_weights(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"{name}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                 for name, items in (("missing", missing), ("unexpected", unexpected), ("shape (file vs config)", wrong))
                 if items]
        raise DataFormatError(path, "weights do not fit the config; " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def write(folder: str | Path, kind: str, config: dict, state: dict[str, torch.Tensor] | None,
          vocab: str | Path | None = None, answers: list[str] | None = None) -> Path:
    """Writes a checkpoint folder, config.json last. `state` None: the weights are the Trainer's own final
    model.safetensors in this folder (a fine-tuning run writes its config before training)."""
    if kind not in KINDS:
        raise MiniVLMError(f"unknown checkpoint kind {kind!r} (expected one of {', '.join(KINDS)})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if state is not None:
        save_weights(state, folder / WEIGHTS, metadata={"kind": kind, "version": str(VERSION)})
    if vocab is not None and Path(vocab).resolve() != (folder / VOCAB).resolve():
        with atomic_path(folder / VOCAB) as tmp:
            shutil.copyfile(vocab, tmp)
    if answers is not None:
        write_lines(folder / ANSWERS, answers)
    write_json(folder / CONFIG, {"kind": kind, "version": VERSION, "minivlm": __version__, "config": config}, indent=1)
    return folder


def read(folder: str | Path, *kinds: str) -> Checkpoint:
    """The checkpoint in `folder`, which must be one of `kinds` (KINDS and/or HF_BERT)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(folder, "checkpoint folder not found")
    path = folder / CONFIG
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(path, "expected a JSON object")
    wanted = " or ".join(kinds)
    if "kind" in data:
        kind, version = data["kind"], data.get("version")
        if kind not in KINDS or not isinstance(version, int):
            raise DataFormatError(path, f"kind {kind!r}, version {version!r}: not a minivlm checkpoint "
                                        f"(kinds: {', '.join(KINDS)})")
        if version > VERSION:
            raise DataFormatError(path, f"format version {version} is newer than this minivlm reads ({VERSION}); "
                                        "upgrade minivlm")
        ckpt = Checkpoint(folder, kind, _field(path, data, "config", dict), version)
    elif _is_hf_bert(data):
        ckpt = Checkpoint(folder, HF_BERT, data, 0)
    else:
        old = old_format(data)
        if old is None:
            raise DataFormatError(path, f"not a checkpoint folder (no \"kind\"; expected a {wanted} folder)")
        raise DataFormatError(path, f"{old} folder of the earlier format (no \"kind\"/\"version\"); run "
                                    f"`python -m minivlm.checkpoint upgrade {folder}` or re-run {_STAGE[old]}")
    if ckpt.kind not in kinds:
        raise DataFormatError(path, f"a {ckpt.kind} folder, where a {wanted} folder is needed")
    if ckpt.kind != HF_BERT and not ckpt.weights.is_file():
        raise DataFormatError(ckpt.weights, "weights file not found (did the run that writes it finish?)")
    return ckpt


def _is_hf_bert(data: dict) -> bool:
    archs = data.get("architectures") or []
    return data.get("model_type") == "bert" or any(str(a).startswith("Bert") for a in archs)


def old_format(data: dict) -> str | None:
    """The kind of a folder of the earlier formats (before "kind"), from its config.json; None: not one."""
    meta = data.get("minivlm")
    if data.get("format") == "minivlm-model":
        return "model"
    if isinstance(meta, dict) and meta.get("format") == "minivlm-task":
        return "task"
    if "backbone" in data:
        return "detector"
    if "num_layers" in data:  # save_model_folder: a BertConfig, weights under Hugging Face names
        return "pretrain"
    return None


def _hf_bert_config(data: dict, path: Path) -> BertConfig:
    try:
        return BertConfig(
            name=str(data.get("_name_or_path") or path.parent.name), num_layers=int(data["num_hidden_layers"]),
            hidden_size=int(data["hidden_size"]), intermediate_size=int(data["intermediate_size"]),
            num_heads=int(data["num_attention_heads"]), vocab_size=int(data["vocab_size"]),
            max_position=int(data.get("max_position_embeddings", 512)),
            type_vocab_size=int(data.get("type_vocab_size", 2)),
            dropout=float(data.get("hidden_dropout_prob", 0.1)),
            layer_norm_eps=float(data.get("layer_norm_eps", 1e-12)),
        )
    except KeyError as err:
        raise DataFormatError(path, f"missing field {err.args[0]!r}") from None


def _field(path: Path, obj: Any, key: str, kind: type, where: str = "") -> Any:
    name = f"{where}.{key}" if where else key
    if not isinstance(obj, dict):
        raise DataFormatError(path, f"{where or 'top level'}: expected an object")
    if key not in obj:
        raise DataFormatError(path, f"{name}: missing")
    if not isinstance(obj[key], kind):
        raise DataFormatError(path, f"{name}: expected {kind.__name__}")
    return obj[key]


# ---------------------------------------------------------------------------------------------- upgrade


def upgrade(folder: str | Path) -> str:
    """Rewrites a folder of the earlier formats in place; returns the kind it now has."""
    folder = Path(folder)
    path = folder / CONFIG
    data = read_json(path)
    old = old_format(data) if isinstance(data, dict) and "kind" not in data else None
    if old is None:
        raise MiniVLMError(f"{path}: not a folder of the earlier formats; nothing to upgrade")
    if old == "detector":  # same weights and names: only config.json changes
        spec = DetectorSpec.from_json({"tee": data, "class_names": data.get("class_names"),
                                       "attribute_names": data.get("attribute_names")}, path)
        write(folder, "detector", spec.to_json(), None)
    elif old == "task":  # same weights and names: only config.json changes
        meta = {k: v for k, v in data["minivlm"].items() if k not in ("format", "version", "task")}
        spec = TaskSpec(data["minivlm"]["task"], from_dict(BertConfig, data), meta)
        write(folder, "task", spec.to_json(), None)
    elif old == "pretrain":
        _upgrade_pretrain(folder, data)
    else:
        _upgrade_model(folder, data)
    return read(folder, *KINDS).kind


def _upgrade_pretrain(folder: Path, data: dict) -> None:
    # Weights were stored under Hugging Face names: load them into the module they belong to, by type.
    from minivlm.fusion.loading import load_canonical, read_hf_checkpoint

    meta = dict(data.get("minivlm") or {})
    cfg = from_dict(BertConfig, data)
    task = meta.pop("task", "pretrain")
    vocab = folder / VOCAB if (folder / VOCAB).is_file() else None
    if task in TASKS:  # the caption folder train_caption used to write
        from minivlm.model import build_task_model
        from minivlm.text.tokenizer import Tokenizer

        model = build_task_model(task, cfg, tokenizer=Tokenizer(vocab) if vocab else None)
        kind, config = "task", TaskSpec(task, cfg, meta).to_json()
    else:
        from minivlm.tasks.pretrain import PretrainModel

        model = PretrainModel(cfg)
        kind, config = "pretrain", {"bert": to_dict(cfg), **meta}
    load_canonical(model, read_hf_checkpoint(folder), str(folder))
    write(folder, kind, config, model.state_dict())


def _upgrade_model(folder: Path, data: dict) -> None:
    det = data["detector"]
    spec = DetectorSpec(tee_config(det["config"]), read_lines(folder / data["files"]["tags"]),
                        read_lines(folder / data["files"]["attributes"]))
    state = {f"detector.{k}": v for k, v in load_weights(folder / det["weights"]).items()}
    tasks = {}
    for name, meta in data["tasks"].items():
        state.update({f"tasks.{name}.{k}": v for k, v in load_weights(folder / meta["weights"]).items()})
        extra = {"num_answers": meta["num_answers"]} if "num_answers" in meta else {}
        tasks[name] = TaskSpec(name, from_dict(BertConfig, meta["bert"]), extra).to_json()
    write(folder, "model", {"detector": spec.to_json(), "tasks": tasks}, state)
    for old in [det["weights"], data["files"]["tags"], data["files"]["attributes"]] + \
               [m["weights"] for m in data["tasks"].values()]:
        (folder / old).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minivlm.checkpoint",
                                     description="Rewrite checkpoint folders of the earlier formats in place.")
    parser.add_argument("command", choices=["upgrade"])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    failed = 0
    for folder in args.folders:  # one bad folder is reported and the others still upgraded
        try:
            print(f"{folder}: now a {upgrade(folder)} folder (format version {VERSION})")
        except MiniVLMError as err:
            print(f"python -m minivlm.checkpoint upgrade: error: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
