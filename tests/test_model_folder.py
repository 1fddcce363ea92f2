"""One model folder (detector + one transformer per task): save/load round trip, assembly from training
outputs, clear errors for broken folders, the Python API and the inference commands."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from minivlm.config import BertConfig, get_tee
from minivlm.errors import DataFormatError, MiniVLMError
from minivlm.io import read_json, write_json
from minivlm.model import MiniVLM, build_task_model, write_lines, write_task_config
from minivlm.text.tokenizer import get_tokenizer

BERT = BertConfig("tiny", num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2, vocab_size=30522,
                  dropout=0.0, region_dim=16, max_regions=4, max_text_len=10, max_tag_len=6)
TEE_CFG = dataclasses.replace(get_tee("tee-demo"), image_size=128, fpn_channels=16, fpn_layers=1, rpn_pre_nms_topk=100,
                              rpn_post_nms_topk=20, max_regions=4, region_dim=16, num_classes=3, num_attributes=2)
ANSWERS = ["yes", "no", "red", "two"]



def build_model() -> MiniVLM:
    from minivlm.vision.tee import TEE

    torch.manual_seed(0)
    # channels-last, as `load_detector` hands it out: on an AVX512 CPU oneDNN sums a convolution in another order
    # for each weight layout, and the folders' outputs are compared with this model's bit for bit
    detector = TEE(TEE_CFG, ["circle", "square", "star"], ["red", "blue"]).to(memory_format=torch.channels_last)
    # VQA reads the mean of its tokens: the round trip must keep the pooling, or its answers change
    tasks = {t: build_task_model(t, BERT, len(ANSWERS) if t == "vqa" else None,
                                 extra={"pool": "text-mean"} if t == "vqa" else None)
             for t in ("caption", "vqa", "nlvr2", "retrieval")}
    for m in tasks.values():  # larger than BERT's init, so different inputs give visibly different outputs
        for p in m.parameters():
            p.data.normal_(0, 0.3) if p.dim() > 1 else None
    return MiniVLM(detector, tasks, get_tokenizer(), ANSWERS).eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("mf")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    paths = []
    for i, size in enumerate([(120, 90), (64, 100), (100, 100)]):
        p = root / "imgs" / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    model = build_model()
    model.save_pretrained(root / "model")
    return root, model, paths


def outputs(model: MiniVLM, paths) -> dict:
    with torch.no_grad():
        return {
            "features": torch.cat([r.features for r in model.regions(paths)]),
            "answers": model.answer_scores(paths, ["what color is it?", "is there a star?", "how many?"], top_k=2),
            "verify": model.verify_proba(paths[:2], paths[1:], ["the left image has a red circle"] * 2),
            "rank": model.rank(paths, ["a red circle", "two stars", "a square"]),
            "caption": model.caption(paths[:2]),
        }


def assert_same(a: dict, b: dict) -> None:
    assert torch.equal(a["features"], b["features"]) and torch.equal(a["rank"], b["rank"])
    assert a["answers"] == b["answers"] and a["verify"] == b["verify"] and a["caption"] == b["caption"]


def test_round_trip_gives_identical_outputs_without_unpickling(env, monkeypatch):
    root, model, paths = env
    names = sorted(p.name for p in (root / "model").iterdir())
    assert names == ["answers.txt", "config.json", "model.safetensors", "vocab.txt"]
    before = outputs(model, paths)

    def refuse(*a, **k):
        raise AssertionError("loading a model folder must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded = MiniVLM.from_pretrained(root / "model")  # no exported graphs: PyTorch
    assert isinstance(loaded, MiniVLM)
    assert set(loaded.tasks) == {"caption", "vqa", "nlvr2", "retrieval"} and loaded.answers == ANSWERS
    assert_same(before, outputs(loaded, paths))
    config = read_json(root / "model" / "config.json")
    assert config["kind"] == "model" and config["version"] == 1 and config["minivlm"]
    assert config["config"]["detector"]["tee"]["region_dim"] == 16 and config["config"]["detector"]["class_names"][0] == "circle"
    assert config["config"]["tasks"]["vqa"]["bert"]["hidden_size"] == 32


def test_api_shapes_and_behaviour(env):
    root, model, paths = env
    from PIL import Image as PILImage

    pil = [PILImage.open(p) for p in paths]
    assert torch.equal(model.rank(pil, ["a"]), model.rank(paths, ["a"]))  # PIL images and paths agree
    scores = model.rank(paths, ["a red circle", "two stars"])
    assert scores.shape == (3, 2)
    top = model.retrieve(paths, "two stars", top_k=2)
    assert [i for i, _ in top] == torch.argsort(scores[:, 1], descending=True)[:2].tolist()
    one_image = model.answer(paths[0], ["what color?", "is it big?"])  # one image, several questions
    assert len(one_image) == 2 and all(a in ANSWERS for a in one_image)
    assert model.verify(paths[0], paths[1], "a statement") in ([True], [False])
    regions = model.regions(paths)
    assert model.answer(regions[:1], "what color?") == model.answer(paths[:1], "what color?")  # Regions pass through
    with pytest.raises(MiniVLMError, match="2 images for 3 questions"):
        model.answer(paths[:2], ["a", "b", "c"])
    partial = MiniVLM(model.detector, {"vqa": model.tasks["vqa"]}, model.tokenizer, ANSWERS)
    with pytest.raises(MiniVLMError, match="no caption transformer"):
        partial.caption(paths[:1])


def _copy(root, name: str):
    dst = root / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(root / "model", dst)
    return dst


def test_missing_files_fail_clearly(env):
    root, _, _ = env
    for missing in ("answers.txt", "vocab.txt", "model.safetensors", "config.json"):
        broken = _copy(root, "broken")
        (broken / missing).unlink()
        with pytest.raises(DataFormatError, match=missing.replace(".", r"\.")):
            MiniVLM.from_pretrained(broken)
    broken = _copy(root, "broken")
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="model.safetensors"):
        MiniVLM.from_pretrained(broken)
    with pytest.raises(DataFormatError, match="not found"):
        MiniVLM.from_pretrained(root / "nowhere")


def test_region_dim_mismatch_is_refused(env):
    root, model, _ = env
    broken = _copy(root, "wide")
    config = read_json(broken / "config.json")
    config["config"]["tasks"]["vqa"]["bert"]["region_dim"] = 2048  # e.g. a transformer trained on VinVL features
    write_json(broken / "config.json", config)
    with pytest.raises(MiniVLMError, match=r"2048-d.*16-d|16-d.*2048-d"):
        MiniVLM.from_pretrained(broken)
    wide = build_task_model("nlvr2", dataclasses.replace(BERT, region_dim=2048))
    with pytest.raises(MiniVLMError, match="region"):
        MiniVLM(model.detector, {"nlvr2": wide})
    # weights that do not fit their config name the file
    broken = _copy(root, "shape")
    config = read_json(broken / "config.json")
    config["config"]["tasks"]["retrieval"]["bert"]["intermediate_size"] = 48
    write_json(broken / "config.json", config)
    with pytest.raises(DataFormatError, match=r"model\.safetensors.*tasks\.retrieval\..*ffn_in"):
        MiniVLM.from_pretrained(broken)


def test_assemble_from_detector_and_finetune_folders(env):
    from minivlm.vision.tee import save_detector

    root, model, paths = env
    save_detector(model.detector, root / "det")
    folders = {}
    for task, m in model.tasks.items():
        folder = root / f"ft_{task}"
        write_task_config(folder, task, m.cfg, state=m.state_dict(), **({"pool": m.pool} if task == "vqa" else {}))
        shutil.copyfile(model.tokenizer.vocab_path, folder / "vocab.txt")
        if task == "vqa":
            write_lines(folder / "answers.txt", ANSWERS)
        folders[task] = folder
    assembled = MiniVLM.assemble(root / "det", folders)
    assert_same(outputs(model, paths), outputs(assembled, paths))
    with pytest.raises(MiniVLMError, match="holds a fine-tuned vqa model"):
        MiniVLM.assemble(root / "det", {"nlvr2": folders["vqa"]})
    wide = dataclasses.replace(BERT, region_dim=2048)
    write_task_config(root / "ft_nlvr2", "nlvr2", wide)
    with pytest.raises(MiniVLMError, match="2048"):
        MiniVLM.assemble(root / "det", {"nlvr2": root / "ft_nlvr2"})


# ---------------------------------------------------------------------------------------------- commands


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from minivlm.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_commands_print_json(env, capsys):
    root, model, paths = env
    m = root / "model"
    for backend in ("auto", "torch"):
        rc, out, _ = _cli(capsys, "caption", m, *paths[:2], "--json", "--backend", backend)
        assert rc == 0 and [d["caption"] for d in json.loads(out)] == model.caption(paths[:2])
    rc, out, _ = _cli(capsys, "vqa", m, paths[0], "what color is it?", "how many?", "--json", "--top", "3")
    doc = json.loads(out)
    assert rc == 0 and len(doc) == 2 and len(doc[0]["top"]) == 3
    assert doc[0]["answer"] == model.answer(paths[0], "what color is it?")[0]
    rc, out, _ = _cli(capsys, "nlvr2", m, paths[0], paths[1], "both images have a star", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["prediction"] == (doc["probability"] > 0.5)
    rc, out, _ = _cli(capsys, "retrieve", m, "--images", root / "imgs", "--query", "a red circle", "--top", "2", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["n_images"] == 3 and [r["rank"] for r in doc["results"]] == [1, 2]
    rc, out, _ = _cli(capsys, "vqa", m, paths[0], "what color is it?")
    assert rc == 0 and out.startswith("what color is it?\t")


def test_commands_fail_cleanly_on_bad_input(env, capsys):
    root, _, paths = env
    m = root / "model"
    for argv in (("vqa", m, root / "bad.jpg", "what?", "--json"), ("nlvr2", m, root / "missing.png", paths[0], "a statement"),
                 ("nlvr2", m, paths[0], paths[1], "  "), ("retrieve", m, "--images", root / "imgs", "--query", "")):
        rc, out, err = _cli(capsys, *argv)
        assert rc == 1 and "Traceback" not in err and out == ""
        assert ("bad.jpg" in err or "missing.png" in err or "statement is only whitespace" in err
                or "query is empty" in err) and "error" in err
    rc, _, err = _cli(capsys, "caption", root / "no_model", paths[0])
    assert rc == 1 and "no_model" in err and "Traceback" not in err
    rc, _, err = _cli(capsys, "caption", m, paths[0], "--backend", "onnx")  # never exported
    assert rc == 1 and "no ONNX graphs" in err and "minivlm export" in err and "Traceback" not in err
    rc, _, err = _cli(capsys, "retrieve", m, "--images", root / "nowhere", "--query", "x")
    assert rc == 1 and "nowhere" in err


def test_batch_commands_go_on_past_bad_items(env, capsys, tmp_path):
    root, model, paths = env
    m = root / "model"
    rc, out, err = _cli(capsys, "caption", m, paths[0], root / "bad.jpg", root / "missing.png", paths[1], "--json")
    doc = json.loads(out)
    assert rc == 1 and [d.get("caption") for d in doc] == [model.caption(paths[0])[0], None, None, model.caption(paths[1])[0]]
    assert "bad.jpg" in doc[1]["error"] and "not found" in doc[2]["error"]
    lines = err.strip().splitlines()  # one line per bad item, naming it
    assert len(lines) == 2 and "bad.jpg" in lines[0] and "missing.png" in lines[1] and "Traceback" not in err
    rc, out, _ = _cli(capsys, "caption", m, paths[0], root / "bad.jpg")  # text output: the good items' lines
    assert rc == 1 and out.strip() == f"{paths[0]}\t{model.caption(paths[0])[0]}"

    rc, out, err = _cli(capsys, "vqa", m, paths[0], "", "what color is it?", "   ", "--json")
    doc = json.loads(out)
    assert rc == 1 and doc[1]["answer"] == model.answer(paths[0], "what color is it?")[0]
    assert doc[0]["error"] == "question 1 is empty" and doc[2]["error"] == "question 3 is only whitespace"
    assert "answer" not in doc[0] and len(err.strip().splitlines()) == 2

    folder = tmp_path / "imgs"
    shutil.copytree(root / "imgs", folder)
    shutil.copy(root / "bad.jpg", folder / "zz_bad.jpg")
    rc, out, err = _cli(capsys, "retrieve", m, "--images", folder, "--query", "a red circle", "--top", "5", "--json")
    doc = json.loads(out)
    assert rc == 1 and doc["n_images"] == 3 and len(doc["results"]) == 3 and "zz_bad.jpg" in err
    assert [e["image"] for e in doc["errors"]] == [str(folder / "zz_bad.jpg")]
    assert sorted(r["image"] for r in doc["results"]) == sorted(str(folder / p.name) for p in paths)


def test_empty_text_is_refused_and_long_text_cut_with_a_warning(env, caplog):
    _, model, paths = env
    for call in (lambda: model.answer_scores(paths[0], ["what color is it?", " "]),
                 lambda: model.verify_proba(paths[0], paths[1], ""), lambda: model.retrieve(paths, "\n"),
                 lambda: model.rank(paths, ["a circle", None])):  # rank scores "" (a poor match), not None
        with pytest.raises(MiniVLMError, match="empty|whitespace|not text"):
            call()
    budget = BERT.max_text_len - 2  # [CLS] and [SEP]
    words = "red blue green yellow circle square star heart one two three four".split()
    long_q = " ".join(words)
    with caplog.at_level("WARNING", logger="minivlm"):
        long_scores = model.answer_scores(paths[0], long_q)
    assert f"is {len(words)} word pieces long; the model reads the first {budget}" in caplog.text
    assert long_scores == model.answer_scores(paths[0], " ".join(words[:budget]))  # what the model reads
    caplog.clear()
    with caplog.at_level("WARNING", logger="minivlm"):
        model.answer_scores(paths[0], " ".join(words[:budget]))
    assert caplog.text == ""


def test_distill_goes_on_past_bad_images_and_resumes(env, capsys, tmp_path):
    root, model, paths = env
    images = tmp_path / "unlabeled"
    shutil.copytree(root / "imgs", images)
    shutil.copy(root / "bad.jpg", images / "img1_bad.jpg")
    out = tmp_path / "pseudo.json"
    # a first run that stopped after one batch: its finished row (a caption no model would write) is kept
    out.with_name(out.name + ".partial.jsonl").write_text(
        json.dumps({"file_name": "img0.png", "width": 120, "height": 90, "caption": "kept from the first run"}) + "\n")
    rc, stdout, err = _cli(capsys, "distill", "--teacher", root / "model", "--images", images, "--out", out,
                           "--batch-size", "2", "--backend", "torch")
    errors = [line for line in err.splitlines() if "error" in line]  # the progress bar shares stderr
    assert rc == 1 and len(errors) == 1 and "img1_bad.jpg" in errors[0] and "Traceback" not in err
    coco = read_json(out)
    got = {im["file_name"]: a["caption"] for im, a in zip(coco["images"], coco["annotations"])}
    assert list(got) == ["img0.png", "img1.png", "img2.png"]  # sorted, the bad image left out
    assert got["img0.png"] == "kept from the first run"
    assert [got["img1.png"], got["img2.png"]] == model.caption(paths[1:])
    assert not out.with_name(out.name + ".partial.jsonl").exists()
