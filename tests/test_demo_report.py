"""The demo's report (minivlm/demo_report.py) from hand-made inputs: stage dicts with known numbers, a
small synthetic world and a tiny random model folder, without running the demo's training stages."""

from __future__ import annotations

import dataclasses
import html
import json
import re

import pytest
import torch

from minivlm.config import BertConfig, get_tee
from minivlm.demo import SIZES, Demo
from minivlm.demo_report import summary_metrics, write_report
from minivlm.errors import MiniVLMError

# Text from the data (reference captions, VQA questions, NLVR2 sentences), from the model (its captions)
# and from the cost table, each carrying every HTML-special character.
MARK = {"reference": "<i>ref</i> & \"R\" 'r'", "question": "<q>&\"Q\"'", "statement": "<s>&\"S\"'",
        "model caption": "<script>alert('x')</script> & \"C\"", "cost": "<cost> & \"K\"",
        "metric": "java <missing> & \"M\""}

STAGES = {
    "data": {"stage": "make-data", "seconds": 1.5},
    "detector": {"stage": "train-detector", "seconds": 12.0,
                 "eval": {"map50": 0.625, "map": 0.3125, "loss": 9.0, "per_class": {"circle": 0.5}}},
    "features": {"stage": "extract", "seconds": 2.0},
    "pretrain": {"stage": "pretrain", "seconds": 30.0, "eval": {"mlm_acc": 0.4375, "itm_acc": 0.8125,
                                                               "itm_swap_acc": 0.53125, "loss": 3.0}},
    "caption": {"stage": "finetune caption", "seconds": 40.0, "eval": {"test": {
        "CIDEr": 9.0,  # the task's detail beside the one shape: not what the report reads
        "metrics": {"CIDEr": 0.5625, "METEOR": 0.1875, "SPICE": None, "SPICE_unavailable": MARK["metric"]},
        "baselines": {"baseline_most_common_caption_CIDEr": 0.125}}}},
    "vqa": {"stage": "finetune vqa", "seconds": 50.0, "eval": {
        "val": {"metrics": {"accuracy": 11.0}, "baselines": {"baseline_most_frequent": 1.0}},
        "test": {"metrics": {"accuracy": 57.125}, "baselines": {"baseline_most_frequent": 23.5,
                                                                   "baseline_per_question_type": 42.75}}}},
    "nlvr2": {"stage": "finetune nlvr2", "seconds": 20.0, "eval": {
        "dev": {"metrics": {"accuracy": 1.0}, "baselines": {"chance": 1.0}},
        "test1": {"metrics": {"accuracy": 61.25, "consistency": 12.5}, "baselines": {"chance": 50.0,
                                                                                    "baseline_majority": 52.5}}}},
    # retrieval: missing (never ran, or its DONE.json was lost)
    "model": {"stage": "model folder", "seconds": 3.0},
}
# What the report must show for STAGES: every present stage's metric and its baselines.
EXPECTED = {"detector_map50": 0.625, "detector_map": 0.3125, "pretrain_heldout_mlm_acc": 0.4375,
            "pretrain_heldout_itm_acc": 0.8125, "pretrain_heldout_itm_swap_acc": 0.53125, "caption_CIDEr": 0.5625, "caption_METEOR": 0.1875,
            "caption_SPICE": None, "caption_SPICE_unavailable": MARK["metric"],
            "caption_baseline_most_common_caption_CIDEr": 0.125, "caption_eval_split": "test",
            "vqa_accuracy": 57.125, "vqa_baseline_most_frequent": 23.5, "vqa_baseline_per_question_type": 42.75,
            "vqa_eval_split": "test", "nlvr2_accuracy": 61.25, "nlvr2_consistency": 12.5, "nlvr2_chance": 50.0,
            "nlvr2_baseline_majority": 52.5, "nlvr2_eval_split": "test1"}


# ------------------------------------------------------------------------------------------------
# summary_metrics
# ------------------------------------------------------------------------------------------------

def test_summary_metrics_picks_each_stages_headline_numbers():
    assert summary_metrics(STAGES) == EXPECTED


def test_summary_metrics_prefers_the_test_split_then_test1_then_the_first():
    one = lambda v: {"metrics": {"accuracy": v}, "baselines": {"chance": -v}}  # noqa: E731
    for evals, split, value in [({"val": one(1.0), "test": one(2.0)}, "test", 2.0),
                                ({"dev": one(1.0), "test1": one(3.0)}, "test1", 3.0),
                                ({"test1": one(3.0), "test": one(2.0)}, "test", 2.0),
                                ({"val": one(4.0), "dev": one(5.0)}, "val", 4.0)]:
        out = summary_metrics({"vqa": {"eval": evals}})
        assert out == {"vqa_accuracy": value, "vqa_chance": -value, "vqa_eval_split": split}, evals


def test_summary_metrics_leaves_out_what_is_missing():
    assert summary_metrics({}) == {}
    # Stages that ran without an evaluation, or whose files held none, add nothing (no made-up numbers).
    assert summary_metrics({"detector": {"seconds": 1.0}, "pretrain": {"eval": {}}, "caption": {"eval": None},
                            "vqa": {}, "nlvr2": None, "data": {"seconds": 2.0}}) == {}
    # ... and a detector that reported mAP@0.5 only gives just that.
    assert summary_metrics({"detector": {"eval": {"map50": 0.5}}}) == {"detector_map50": 0.5}
    with pytest.raises(MiniVLMError, match="caption stage"):  # an earlier version's metrics.json: named
        summary_metrics({"caption": {"eval": {"test": {"CIDEr": 0.5}}}})


# ------------------------------------------------------------------------------------------------
# write_report, once, on a small world and a tiny random model
# ------------------------------------------------------------------------------------------------

def _tiny_model():
    from minivlm.model import MiniVLM, build_task_model
    from minivlm.text.tokenizer import get_tokenizer
    from minivlm.vision.tee import TEE

    bert = BertConfig("tiny", num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2, vocab_size=30522,
                      dropout=0.0, region_dim=16, max_regions=4, max_text_len=8, max_tag_len=4)
    tee = dataclasses.replace(get_tee("tee-demo"), image_size=128, fpn_channels=16, fpn_layers=1,
                              rpn_pre_nms_topk=100, rpn_post_nms_topk=20, max_regions=4, region_dim=16,
                              num_classes=3, num_attributes=2)
    torch.manual_seed(0)
    answers = ["yes", "no", "red", "two"]
    tasks = {t: build_task_model(t, bert, len(answers) if t == "vqa" else None)
             for t in ("caption", "vqa", "nlvr2", "retrieval")}
    return MiniVLM(TEE(tee, ["circle", "square", "star"], ["red", "blue"]), tasks, get_tokenizer(), answers).eval()


def _mark_text(path, records_key, field, mark, jsonl=False):
    if jsonl:
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        for r in recs:
            r[field] = f"{mark} {r[field]}"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return
    doc = json.loads(path.read_text())
    for r in doc[records_key]:
        r[field] = f"{mark} {r[field]}"
    path.write_text(json.dumps(doc))


def _log(path, entries):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


@pytest.fixture(scope="module")
def report(tmp_path_factory, request):
    import minivlm.cost
    import minivlm.demo_report
    from minivlm.cost import CostRow
    from minivlm.data.synthetic import generate_world
    from minivlm.model import MiniVLM

    out = tmp_path_factory.mktemp("demo_report") / "run"
    size = dataclasses.replace(SIZES["quick"], images=20, report_images=2)
    demo = Demo(out, size, seed=0, say=lambda s: None)
    generate_world(demo.world, images=size.images, seed=5, nlvr2_pairs=8, workers=1)
    _mark_text(demo.world / "annotations" / "captions_test.json", "annotations", "caption", MARK["reference"])
    _mark_text(demo.world / "vqa" / "v2_OpenEnded_mscoco_test_questions.json", "questions", "question",
               MARK["question"])
    _mark_text(demo.world / "nlvr2" / "test1.json", None, "sentence", MARK["statement"], jsonl=True)
    _tiny_model().save_pretrained(demo.model)

    # Training logs as the trainers write them: captioning's cross-entropy stage under ce/ (its SCST log
    # beside it must not be plotted), NLVR2 with evaluation entries only (nothing to plot), no pretrain log.
    _log(demo.detector / "log.jsonl", [{"step": s, "loss": 4.0 / s, "cls_loss": 2.0 / s} for s in (1, 2, 3)])
    _log(out / "caption" / "ce" / "log.jsonl", [{"step": s, "loss": 7.0 - s / 10} for s in (10, 20)])
    _log(out / "caption" / "log.jsonl", [{"step": s, "loss": 100.0 + s} for s in (1, 2)])
    _log(out / "vqa" / "log.jsonl", [{"step": s, "loss": 3.0 / s, "acc": 0.1 * s} for s in (5, 10)])
    _log(out / "nlvr2" / "log.jsonl", [{"step": 8, "eval": {"accuracy": 50.0}}])

    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    # The paper presets' rows cost ~9 s of FLOP counting on full-size models (minivlm cost has its own
    # tests); one row carries special characters instead.
    mp.setattr(minivlm.cost, "all_rows", lambda: [
        CostRow("paper-x", "total", 12.5, 3.25, 11.0, 3.0, MARK["cost"]),
        CostRow("paper-x", "backbone", 1.0, 1.0, setting="not shown")])
    mp.setattr(MiniVLM, "caption", lambda self, images, **kw: [MARK["model caption"]] * len(images))
    plotted = {}
    real_plot = minivlm.demo_report.plot_curves

    def plot(losses, path, title="", metrics=None):
        plotted[title] = (losses, metrics)
        return real_plot(losses, path, title=title, metrics=metrics)

    mp.setattr(minivlm.demo_report, "plot_curves", plot)
    result = write_report(demo, STAGES)
    mp.undo()
    return demo, result, (out / "report.html").read_text(encoding="utf-8"), plotted


def _metric_row(name: str, cell: str) -> str:
    return f"<tr><td>{name}</td>{cell}</tr>"


def test_report_shows_each_stages_metric_and_its_baseline(report):
    demo, result, page, _ = report
    for key, value in EXPECTED.items():
        if key.endswith("_split"):
            assert f"<td>{key}</td>" not in page, key  # the split is metadata, in metrics.json only
            continue
        cell = ('<td class="muted">-</td>' if value is None else f'<td class="num">{value:.3f}</td>'
                if isinstance(value, float) else f"<td>{html.escape(value)}</td>")
        assert _metric_row(key, cell) in page, key
    # metrics.json: the same numbers, the splits, and each stage's seconds
    metrics = json.loads((demo.out / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if k != "stage_seconds"} == EXPECTED
    assert metrics["stage_seconds"] == {k: v["seconds"] for k, v in STAGES.items()}
    assert result == {"report": str(demo.out / "report.html"), **EXPECTED}


def test_a_missing_stage_is_left_out_not_invented(report):
    demo, result, page, _ = report
    assert "retrieval_" not in page and not any(k.startswith("retrieval") for k in result)
    assert "retrieval" not in json.loads((demo.out / "metrics.json").read_text())["stage_seconds"]
    # The sections that do not depend on the stage dicts are all there.
    for section in ("Metrics (held-out split)", "Detections, tags and captions", "VQA", "NLVR2", "Image retrieval",
                    "Training curves", "Cost"):
        assert f"<h2>{section}</h2>" in page, section


def test_every_picture_the_report_links_exists(report):
    demo, _, page, plotted = report
    sources = [html.unescape(s) for _, s in re.findall(r"""src=(["'])(.*?)\1""", page)]
    assert sources
    for src in sources:
        assert not src.startswith("/") and (demo.out / src).is_file(), src
    dets = [s for s in sources if s.startswith("report/det_")]
    assert len(dets) == demo.size.report_images
    # Curves: one per stage with a loss log, from the cross-entropy log where captioning has one.
    curves = sorted(s for s in sources if "/curve_" in s)
    assert curves == ["report/curve_caption.png", "report/curve_detector.png", "report/curve_vqa.png"]
    assert plotted["caption"][0] == {"loss": [(10, 6.0), (20, 5.0)]}
    assert plotted["detector"][0] == {"loss": [(1, 4.0), (2, 2.0), (3, 4.0 / 3)],
                                      "cls_loss": [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]}
    assert plotted["vqa"][1] == {"acc": [(5, 0.5), (10, 1.0)]}
    from PIL import Image

    for src in curves + dets:
        with Image.open(demo.out / src) as im:
            assert im.width > 50 and im.height > 50, src


def test_special_characters_in_text_are_escaped(report):
    _, _, page, _ = report
    for where, mark in MARK.items():
        assert mark not in page, f"{where} text reached the page unescaped"
        assert html.escape(mark) in page, f"{where} text is missing from the page"
    assert "<script>" not in page
    # Where each kind of text shows: the references under each picture and as retrieval queries
    assert page.count("<b>query:</b> " + html.escape(MARK["reference"])) == 3


def test_cost_table_lists_the_models_used_and_the_paper_rows(report):
    demo, _, page, _ = report
    cost = page.split("<h2>Cost</h2>", 1)[1]
    assert "used: tee-demo" in cost
    for task in ("caption", "vqa", "nlvr2", "retrieval"):
        assert f"used: {task} (tiny)" in cost, task
    assert "<td>paper-x</td><td>total</td>" in cost and "not shown" not in cost  # totals and transformers only
