"""The main job at toy size (CI runs it as a test): every stage, the report, and resuming."""

import json
import subprocess
import sys

import pytest

from minivlm.data.synthetic import split_sizes
from minivlm.demo import SIZES, TASKS


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    r = subprocess.run([sys.executable, "-m", "minivlm.cli", "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r


def test_quick_demo_runs_every_stage_and_writes_the_report(quick_demo):
    out, _ = quick_demo
    for stage in ("world", "detector", "features", "pretrain", *TASKS, "model", "report"):
        assert (out / stage / "DONE.json").is_file(), stage
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("detector_map50", "pretrain_heldout_mlm_acc", "caption_CIDEr", "vqa_accuracy",
                "nlvr2_accuracy", "retrieval_TR@1"):
        assert isinstance(metrics[key], (int, float)), key
    # Every task's score reaches metrics.json with the baseline it must beat.
    for key in ("caption_baseline_most_common_caption_CIDEr", "vqa_baseline_most_frequent",
                "vqa_baseline_per_question_type", "nlvr2_baseline_majority", "retrieval_chance_TR@1",
                "retrieval_chance_IR@1"):
        assert isinstance(metrics[key], (int, float)), key
    # SPICE is never a made-up number: either a score or the reason it is missing.
    assert metrics["caption_SPICE"] is not None or "SPICE" in metrics["caption_SPICE_unavailable"]
    html = (out / "report.html").read_text()
    for section in ("Detections", "VQA", "NLVR2", "Image retrieval", "Training curves", "Cost"):
        assert section in html
    for src in [s.split('"')[0] for s in html.split('src="')[1:]]:
        assert (out / src).is_file(), src
    model = out / "model"
    assert (model / "config.json").is_file() and list(model.glob("*.safetensors"))
    # The caption stage ran the demo's recipe, not finetune's paper defaults.
    caption_train = json.loads((out / "caption" / "ce" / "train_config.json").read_text())
    assert (caption_train["lr"], caption_train["warmup_steps"]) == (SIZES["quick"].task_lr["caption"], 30)
    # ... and its world carries the size's extra supervision (VQA questions, NLVR2 statements).
    params = json.loads((out / "world" / "world.json").read_text())["params"]
    assert (params["questions_per_image"], params["nlvr2_statements"]) == (8, 4)
    vqa = json.loads((out / "vqa" / "metrics.json").read_text())
    assert vqa["n_train"] > 6 * split_sizes(SIZES["quick"].images)[0]  # more than the default 4-6 per image


def test_rerun_skips_finished_stages(quick_demo):
    out, _ = quick_demo
    r = subprocess.run([sys.executable, "-m", "minivlm.cli", "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("skipping") == 4 + len(TASKS) + 2  # data, detector, features, pretrain; tasks; model, report


def test_model_folder_runs_on_real_photos_it_never_saw(quick_demo, tmp_path):
    from PIL import Image
    from skimage import data

    photos = []
    for name in ("astronaut", "chelsea", "camera"):  # RGB 512x512, RGB 451x300, grayscale 512x512
        path = tmp_path / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        photos.append(str(path))
    model = quick_demo[0] / "model"
    r = subprocess.run([sys.executable, "-m", "minivlm.cli", "caption", str(model), *photos, "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout)
    assert len(out) == 3 and all(isinstance(o["caption"], str) and o["caption"].strip() for o in out)
    r = subprocess.run([sys.executable, "-m", "minivlm.cli", "vqa", str(model), photos[1], "what color is the cat?",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout)
