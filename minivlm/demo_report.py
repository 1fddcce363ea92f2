"""The demo's `report.html` and `metrics.json`.

Everything shown about the model is computed here from raw image files through the one model folder
(`MiniVLM.from_pretrained`), exactly as a user would run it; the numbers come from the stages' own
metrics files.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any


from minivlm.errors import MiniVLMError
from minivlm.io import write_json
from minivlm.tasks.data import TASKS
from minivlm.report import Report, card, esc, grid, plot_curves, strip, table
from minivlm.train.trainer import read_log

if TYPE_CHECKING:
    from minivlm.demo import Demo


def summary_metrics(stages: dict[str, dict]) -> dict[str, Any]:
    """The headline numbers of every stage, flat, with the baselines they must beat."""
    out: dict[str, Any] = {}
    det = stages.get("detector", {}).get("eval") or {}
    for key in ("map50", "map"):
        if key in det:
            out[f"detector_{key}"] = det[key]
    pre = stages.get("pretrain", {}).get("eval") or {}
    for key in ("mlm_acc", "itm_acc", "itm_swap_acc"):  # itm_swap_acc: captions against their one-word swaps
        if key in pre:
            out[f"pretrain_heldout_{key}"] = pre[key]
    for task in TASKS:
        evals = (stages.get(task) or {}).get("eval") or {}
        split = "test" if "test" in evals else ("test1" if "test1" in evals else next(iter(evals), None))
        if split is None:
            continue
        # Every task's score has one shape (minivlm/tasks/task.py): its metrics and baselines, flat.
        if "metrics" not in evals[split]:
            raise MiniVLMError(f"the {task} stage's metrics.json is from an earlier version (no 'metrics' / "
                               f"'baselines' per split); delete that stage's folder to rerun it")
        for k, v in {**evals[split].get("metrics", {}), **evals[split].get("baselines", {})}.items():
            out[f"{task}_{k}"] = v
        out[f"{task}_eval_split"] = split
    return out


def _curves(demo: "Demo", pics: Path) -> list[str]:
    blocks = []
    for name, folder in [("detector", demo.detector), ("pretrain", demo.pretrain),
                         *[(t, demo.out / t) for t in TASKS]]:
        if (folder / "ce" / "log.jsonl").is_file():  # captioning logs its cross-entropy stage apart from SCST
            folder = folder / "ce"
        log = [e for e in read_log(folder / "log.jsonl") if "loss" in e]
        if not log:
            continue
        losses = {k: [(e["step"], e[k]) for e in log if k in e] for k in log[-1] if k.endswith("loss")}
        accs = {k: [(e["step"], e[k]) for e in log if k in e] for k in log[-1] if k.endswith("acc")}
        path = plot_curves(losses, pics / f"curve_{name}.png", title=name, metrics=accs)
        blocks.append(f'<img src="{esc(path.relative_to(demo.out))}" style="max-width:560px">')
    return blocks


def write_report(demo: "Demo", stages: dict[str, dict]) -> dict:
    from minivlm.data.world import World
    from minivlm.model import MiniVLM
    from minivlm.vision.draw import draw_regions

    out, pics = demo.out, demo.out / "report"
    pics.mkdir(parents=True, exist_ok=True)
    world = World(demo.world)
    model = MiniVLM.from_pretrained(demo.model, backend="torch")  # the report draws torch Regions
    rng = random.Random(demo.seed)
    n = demo.size.report_images
    metrics = summary_metrics(stages)
    metrics["stage_seconds"] = {k: v.get("seconds") for k, v in stages.items()}

    report = Report("MiniVLM demo on the synthetic world",
                    f"detector {demo.size.detector_preset} + transformer {demo.size.bert_preset}; "
                    f"{demo.size.images} images; every picture below was produced from raw image files by "
                    f"the model folder {demo.model.name}/")

    rows = [{"metric": k, "value": esc(v) if isinstance(v, str) else v} for k, v in metrics.items()
            if not isinstance(v, dict) and not k.endswith("_split")]
    report.section("Metrics (held-out split)", table(rows))

    test = world.instances("test")
    ids = sorted(test.images)
    pick = rng.sample(ids, min(n, len(ids)))
    paths = [world.image_path("test", test.images[i]) for i in pick]

    # Detections and captions, from the raw files.
    regions = model.regions(paths)
    captions = model.caption(paths)
    refs = world.captions("test").captions
    cards = []
    for iid, path, reg, cap in zip(pick, paths, regions, captions):
        pic = pics / f"det_{iid}.jpg"
        draw_regions(path, reg, max_boxes=8).save(pic, quality=90)
        cards.append(card(str(pic.relative_to(out)), [
            f"<b>caption:</b> {esc(cap)}",
            "<span class='muted'>references:</span><br>" + "<br>".join(esc(r) for r in refs.get(iid, [])[:3]),
            "<span class='muted'>tags:</span> " + esc(", ".join(dict.fromkeys(reg.tags[:8]))),
        ]))
    report.section("Detections, tags and captions", grid(cards),
                   note="boxes: TEE regions with score >= 0.3 (attribute, class, score); caption: greedy, KV-cached")

    # VQA
    qs = [q for q in world.vqa("test") if q.image_id in set(pick)][: 3 * n]
    vqa_rows = []
    if qs:
        answers = model.answer([world.vqa_image_path("test", q.image_id) for q in qs], [q.question for q in qs])
        for q, a in zip(qs, answers):
            truth = max(set(q.answers), key=q.answers.count) if q.answers else ""
            ok = a == truth
            vqa_rows.append({"image": q.image_id, "question": esc(q.question), "predicted":
                             f"<span class='{'ok' if ok else 'bad'}'>{esc(a)}</span>", "true": esc(truth)})
    report.section("VQA", table(vqa_rows))

    # NLVR2
    nl_split = world.test_split("nlvr2")
    examples = world.nlvr2(nl_split)[:n] if nl_split else []
    nl_cards = []
    if examples:
        left = [world.nlvr2_image_path(nl_split, e.left_image) for e in examples]
        right = [world.nlvr2_image_path(nl_split, e.right_image) for e in examples]
        verdicts = model.verify(left, right, [e.sentence for e in examples])
        for e, l, r, v in zip(examples, left, right, verdicts):
            ok = bool(v) == e.label
            nl_cards.append(
                f"<div class='card' style='width:400px'><div class='strip'><img src='{esc(_copy(l, pics, out))}'>"
                f"<img src='{esc(_copy(r, pics, out))}'></div><div>{esc(e.sentence)}</div>"
                f"<div>predicted <span class='{'ok' if ok else 'bad'}'>{v}</span>, true {e.label}</div></div>")
    report.section("NLVR2", grid(nl_cards))

    # Retrieval: text -> the top images among a pool of test images.
    pool_ids = rng.sample(ids, min(len(ids), 4 * n))
    pool = [world.image_path("test", test.images[i]) for i in pool_ids]
    strips = []
    for iid in pool_ids[:3]:
        query = refs[iid][0]
        ranked = model.retrieve(pool, query, top_k=5)
        strips.append(strip([(_copy(pool[i], pics, out), pool_ids[i] == iid) for i, _ in ranked],
                            label=f"<b>query:</b> {esc(query)} <span class='muted'>(green: the image it was written for)</span>"))
    report.section("Image retrieval", *strips, note=f"top 5 of {len(pool)} test images")

    report.section("Training curves", *_curves(demo, pics))
    report.section("Cost", _cost_table(model, paths[0]),
                   note="models used here (counted on one test image) and the paper's presets (minivlm cost)")
    write_json(out / "metrics.json", metrics, indent=1)
    report.write(out / "report.html")
    return {"report": str(out / "report.html"), **{k: v for k, v in metrics.items() if not isinstance(v, dict)}}


def _copy(path: Path, pics: Path, out: Path) -> str:
    """A small JPEG copy of an image next to the report (relative link)."""
    from minivlm.data.images import load_image

    target = pics / f"img_{path.parent.name}_{path.stem}.jpg"
    if not target.is_file():
        im = load_image(path)
        im.thumbnail((256, 256))
        im.save(target, quality=88)
    return str(target.relative_to(out))


def _cost_table(model, image_path: Path) -> str:
    from minivlm.cost import all_rows, count_macs, count_params
    from minivlm.data.images import load_image
    from minivlm.fusion.cost import fusion_cost

    image = load_image(image_path)
    det = model.detector
    rows = [{"model": f"used: {det.cfg.name}", "component": "extractor", "params_m": count_params(det) / 1e6,
             "gflops": count_macs(lambda: det.extract([image])) / 1e9, "setting": f"{det.cfg.image_size}px canvas"}]
    for task, m in model.tasks.items():
        cfg = m.cfg
        _, macs = fusion_cost(cfg, cfg.max_regions, cfg.max_text_len)
        rows.append({"model": f"used: {task} ({cfg.name})", "component": "transformer + head",
                     "params_m": count_params(m) / 1e6, "gflops": macs / 1e9,
                     "setting": f"one pass, {cfg.max_regions} regions + {cfg.max_text_len} tokens"})
    for r in all_rows():
        if r.component in ("total", "transformer"):
            rows.append({"model": r.model, "component": r.component, "params_m": r.params_m, "gflops": r.gflops,
                         "paper_params_m": r.paper_params_m, "paper_gflops": r.paper_gflops, "setting": esc(r.setting)})
    return table(rows, ["model", "component", "params_m", "paper_params_m", "gflops", "paper_gflops", "setting"])
