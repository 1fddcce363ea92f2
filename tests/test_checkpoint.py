"""One checkpoint folder format (minivlm/checkpoint.py): each kind round-trips, the kind is read and never
guessed, folders of the earlier formats are refused with one clear line (and upgrade), Hugging Face text
folders still initialise the transformer."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from minivlm import checkpoint
from minivlm.config import BertConfig, get_tee, to_dict
from minivlm.errors import DataFormatError
from minivlm.fusion.loading import canonical_state_dict, load_text_weights
from minivlm.io import read_json, save_weights, write_json, write_lines
from minivlm.model import MiniVLM, build_task_model, load_task_folder, write_task_config
from minivlm.tasks.data import init_from_pretrained, task_bert_config
from minivlm.tasks.pretrain import PretrainModel
from minivlm.text.tokenizer import get_tokenizer, minilm_checkpoint_path
from minivlm.vision.tee import TEE, load_detector, save_detector

BERT = BertConfig("tiny", num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2, vocab_size=30522,
                  dropout=0.0, region_dim=16, max_regions=4, max_text_len=10, max_tag_len=6)
TEE_CFG = dataclasses.replace(get_tee("tee-demo"), image_size=128, fpn_channels=16, fpn_layers=1, rpn_pre_nms_topk=100,
                              rpn_post_nms_topk=20, max_regions=4, region_dim=16, num_classes=3, num_attributes=2)
ANSWERS = ["yes", "no", "red"]


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def detector() -> TEE:
    torch.manual_seed(0)
    return TEE(TEE_CFG, ["circle", "square", "star"], ["red", "blue"]).eval()


def kind_of(folder) -> str:
    return read_json(folder / "config.json")["kind"]


# ---------------------------------------------------------------------------------------------- round trips


def test_detector_round_trip(tmp_path, detector):
    save_detector(detector, tmp_path / "det")
    assert kind_of(tmp_path / "det") == "detector"
    loaded = load_detector(tmp_path / "det")
    assert loaded.cfg == detector.cfg and loaded.class_names == detector.class_names and same_state(loaded, detector)


def test_pretrain_round_trip(tmp_path):
    torch.manual_seed(0)
    pre = PretrainModel(BERT)
    checkpoint.write(tmp_path / "pre", "pretrain", {"bert": to_dict(BERT), "tags": "gt"}, pre.state_dict(),
                     vocab=get_tokenizer().vocab_path)
    ckpt = checkpoint.read(tmp_path / "pre", "pretrain")
    assert ckpt.kind == "pretrain" and ckpt.bert_config() == BERT and ckpt.config["tags"] == "gt"
    assert ckpt.vocab is not None and set(ckpt.state_dict()) == set(pre.state_dict())  # module names as saved
    again = PretrainModel(ckpt.bert_config())
    report = load_text_weights(again, tmp_path / "pre")
    assert not report.missing and not report.unused and same_state(again, pre)


def test_task_round_trip(tmp_path):
    torch.manual_seed(0)
    vqa = build_task_model("vqa", BERT, len(ANSWERS))
    write_task_config(tmp_path / "vqa", "vqa", BERT, state=vqa.state_dict(), num_answers=len(ANSWERS), train_split="train")
    write_lines(tmp_path / "vqa" / "answers.txt", ANSWERS)
    ckpt, loaded = load_task_folder(tmp_path / "vqa")
    spec = ckpt.task_spec()
    assert ckpt.kind == "task" and spec.task == "vqa" and spec.bert == BERT and spec.extra["train_split"] == "train"
    assert ckpt.answers() == ANSWERS and same_state(loaded, vqa)


def test_a_task_folder_with_its_own_head_initialises_another_task(tmp_path):
    """A region-attention VQA folder (its head has weights a [CLS] head has not) starts an NLVR2 model: the
    loader rebuilds the folder's model with its pooling before taking the transformer from it."""
    torch.manual_seed(0)
    vqa = build_task_model("vqa", BERT, len(ANSWERS), extra={"pool": "region-attention"})
    write_task_config(tmp_path / "vqa", "vqa", BERT, state=vqa.state_dict(), num_answers=len(ANSWERS),
                      pool="region-attention")
    write_lines(tmp_path / "vqa" / "answers.txt", ANSWERS)
    nlvr2 = build_task_model("nlvr2", BERT)
    init_from_pretrained(nlvr2, tmp_path / "vqa")
    assert all(torch.equal(a, b) for a, b in zip(nlvr2.bert.state_dict().values(), vqa.bert.state_dict().values()))


def test_model_round_trip_is_one_weights_file(tmp_path, detector):
    torch.manual_seed(0)
    # VQA with the region-attention head and its null slot: the folder must bring both back
    tasks = {"vqa": build_task_model("vqa", BERT, len(ANSWERS), extra={"pool": "region-attention", "null_region": True}),
             "nlvr2": build_task_model("nlvr2", BERT)}
    with torch.no_grad():
        tasks["vqa"].region_attention.null_key.normal_()
    model = MiniVLM(detector, tasks, get_tokenizer(), ANSWERS)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["answers.txt", "config.json", "model.safetensors",
                                                                  "vocab.txt"]
    assert kind_of(tmp_path / "m") == "model"
    loaded = MiniVLM.from_pretrained(tmp_path / "m")
    assert set(loaded.tasks) == {"vqa", "nlvr2"} and loaded.answers == ANSWERS and same_state(loaded, model)
    assert loaded.tasks["vqa"].null_region and not loaded.tasks["nlvr2"].null_region
    assert loaded.detector.cfg == detector.cfg and loaded.detector.attribute_names == ["red", "blue"]


# ---------------------------------------------------------------------------------------------- kinds


def test_the_kind_is_read_not_guessed(tmp_path, detector):
    save_detector(detector, tmp_path / "det")
    with pytest.raises(DataFormatError, match="a detector folder, where a pretrain or task"):
        init_from_pretrained(build_task_model("nlvr2", BERT), tmp_path / "det")
    with pytest.raises(DataFormatError, match="where a model folder is needed"):
        MiniVLM.from_pretrained(tmp_path / "det")
    # weights under task-model names, declared "pretrain": read as a PretrainModel, which they do not fit
    nlvr2 = build_task_model("nlvr2", BERT)
    checkpoint.write(tmp_path / "p", "pretrain", {"bert": to_dict(BERT)}, nlvr2.state_dict())
    with pytest.raises(DataFormatError, match="model.safetensors: weights do not fit"):
        init_from_pretrained(build_task_model("nlvr2", BERT), tmp_path / "p")
    data = read_json(tmp_path / "det" / "config.json")
    write_json(tmp_path / "det" / "config.json", {**data, "version": checkpoint.VERSION + 1})
    with pytest.raises(DataFormatError, match="newer than this minivlm reads"):
        load_detector(tmp_path / "det")


def _old_pretrain_folder(folder, model: PretrainModel) -> None:
    """What `save_model_folder` wrote before: a bare BertConfig, weights under Hugging Face names."""
    save_weights(canonical_state_dict(model), folder / "model.safetensors")
    write_json(folder / "config.json", {**to_dict(model.cfg), "minivlm": {"task": "pretrain"}})
    shutil.copyfile(get_tokenizer().vocab_path, folder / "vocab.txt")


def _old_detector_folder(folder, detector: TEE) -> None:
    save_weights(detector.state_dict(), folder / "model.safetensors")
    write_json(folder / "config.json", {**to_dict(detector.cfg), "class_names": detector.class_names,
                                        "attribute_names": detector.attribute_names})


def test_an_old_folder_gives_one_clear_line_and_upgrades(tmp_path, detector):
    torch.manual_seed(0)
    pre = PretrainModel(BERT)
    (tmp_path / "pre").mkdir()
    _old_pretrain_folder(tmp_path / "pre", pre)
    with pytest.raises(DataFormatError) as err:
        init_from_pretrained(build_task_model("vqa", BERT, 3), tmp_path / "pre")
    message = str(err.value)
    assert "\n" not in message and "pretrain folder of the earlier format" in message
    assert "python -m minivlm.checkpoint upgrade" in message and "minivlm pretrain" in message
    assert checkpoint.main(["upgrade", str(tmp_path / "pre")]) == 0
    again = PretrainModel(checkpoint.read(tmp_path / "pre", "pretrain").bert_config())
    again.load_state_dict(checkpoint.read(tmp_path / "pre", "pretrain").state_dict())
    assert same_state(again, pre)

    (tmp_path / "det").mkdir()
    _old_detector_folder(tmp_path / "det", detector)
    with pytest.raises(DataFormatError, match="detector folder of the earlier format.*minivlm train-detector"):
        load_detector(tmp_path / "det")
    assert checkpoint.upgrade(tmp_path / "det") == "detector"
    assert same_state(load_detector(tmp_path / "det"), detector)


def test_upgrade_reports_a_bad_folder_in_one_line_and_goes_on(tmp_path, detector, capsys):
    (tmp_path / "det").mkdir()
    _old_detector_folder(tmp_path / "det", detector)
    assert checkpoint.main(["upgrade", str(tmp_path / "missing"), str(tmp_path / "det")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing" in err and "Traceback" not in err
    assert checkpoint.read(tmp_path / "det", "detector").kind == "detector"  # the good one was still upgraded


def test_an_old_model_folder_upgrades(tmp_path, detector):
    torch.manual_seed(0)
    vqa = build_task_model("vqa", BERT, len(ANSWERS))
    folder = tmp_path / "m"
    folder.mkdir()
    save_weights(detector.state_dict(), folder / "detector.safetensors")
    save_weights(vqa.state_dict(), folder / "vqa.safetensors")
    for name, lines in (("tags", detector.class_names), ("attributes", detector.attribute_names), ("answers", ANSWERS)):
        write_lines(folder / f"{name}.txt", lines)
    shutil.copyfile(get_tokenizer().vocab_path, folder / "vocab.txt")
    write_json(folder / "config.json", {
        "format": "minivlm-model", "version": 1,
        "detector": {"weights": "detector.safetensors", "config": to_dict(detector.cfg)},
        "tasks": {"vqa": {"weights": "vqa.safetensors", "bert": to_dict(BERT), "num_answers": len(ANSWERS)}},
        "files": {"vocab": "vocab.txt", "tags": "tags.txt", "attributes": "attributes.txt", "answers": "answers.txt"}})
    with pytest.raises(DataFormatError, match="model folder of the earlier format"):
        MiniVLM.from_pretrained(folder)
    assert checkpoint.upgrade(folder) == "model"
    loaded = MiniVLM.from_pretrained(folder)
    assert same_state(loaded.detector, detector) and same_state(loaded.tasks["vqa"], vqa) and loaded.answers == ANSWERS
    assert not (folder / "detector.safetensors").exists()


# ---------------------------------------------------------------------------------------------- Hugging Face


def test_a_hugging_face_text_folder_still_initialises(tmp_path):
    folder = minilm_checkpoint_path()
    ckpt = checkpoint.read(folder, "pretrain", checkpoint.HF_BERT)
    assert ckpt.kind == checkpoint.HF_BERT  # from config.json's model_type, not from weight names
    cfg = task_bert_config(folder, "minilm", feature_dim=16)
    assert (cfg.num_layers, cfg.hidden_size, cfg.region_dim) == (6, 384, 16)
    cfg = dataclasses.replace(cfg, num_layers=2)  # two of its six layers: fast enough
    model = build_task_model("nlvr2", cfg)
    summary = init_from_pretrained(model, folder)
    assert summary.startswith("loaded") and "layers loaded: 0-1" in summary
    with pytest.raises(DataFormatError, match="huggingface-bert folder, where a model folder"):
        MiniVLM.from_pretrained(folder)


def test_atomic_writes_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    # A model folder written by one user must be readable by the server running as another.
    import os
    import stat

    old = os.umask(0o022)
    os.umask(old)
    write_json(tmp_path / "a.json", {"x": 1})
    save_weights({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    for name in ("a.json", "w.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~old, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
