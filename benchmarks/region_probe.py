"""What the region features encode: linear probes from a region's feature to its object's class and attributes.

    python benchmarks/region_probe.py --data runs/demo/world --features runs/demo/features [--out runs/probe]
    python benchmarks/region_probe.py --data runs/demo/world --detector runs/demo/detector

With --features, every ground-truth object of a split is matched to the stored region that overlaps it most
(IoU >= 0.5); a linear classifier (multinomial logistic regression on standardised features, fitted to
convergence by L-BFGS, its L2 weight chosen on a fifth of the training objects held out) is fitted per target
(the class, and each attribute group: colour, size, texture in the synthetic world) on the training split and
scored on the held-out split, beside the majority-class rate, overall and per size of the object
(`eval_acc_by_size`: whether an attribute is lost on small objects, to the detector's input resolution, or at
every size). A transformer cannot answer "what colour is the cross?" better than the features let it, so this
separates what the extractor gives from what the fusion learns (docs/RESULTS.md). Where the store keeps tags,
the detector's own class decision on the same matched objects is reported too (overall, per class, per size,
the most frequent confusions): the object tags the transformer reads are only as right as that. With
--detector, the probes run on the ground-truth boxes at each point of the detector's region path instead (the
pixels under the box, the RoIAlign output the head reads, after the first linear layer, the region feature),
which shows where an attribute is lost. Prints a table and writes OUT/region_probe.json
(OUT/region_path_probe.json with --detector).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minivlm.data.feature_store import FeatureStore  # noqa: E402
from minivlm.data.world import World  # noqa: E402
from minivlm.io import write_json  # noqa: E402

Targets = dict[str, list[int]]  # target name -> label per matched object (-1: the object has none)


class TargetReader:
    """An object's probe targets in a split: its class, and its attribute of each group (-1: none)."""

    def __init__(self, inst):
        self.classes, self.attrs = inst.category_index(), inst.attribute_index()
        self.group_of = {a.id: a.group or "attribute" for a in inst.attributes}
        self.groups = sorted(set(self.group_of.values()))

    def empty(self) -> Targets:
        return {"class": [], **{g: [] for g in self.groups}}

    def add(self, targets: Targets, ann) -> None:
        targets["class"].append(self.classes[ann.category_id])
        for g in self.groups:
            ids = [self.attrs[i] for i in ann.attribute_ids if self.group_of.get(i) == g]
            targets[g].append(ids[0] if ids else -1)


def boxes_xyxy(anns) -> torch.Tensor:
    return torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a.bbox for a in anns)], dtype=torch.float32)


def best_regions(anns, regions) -> tuple[list[float], list[int]]:
    """Per ground-truth object: the IoU of the region that overlaps it most, and that region's index."""
    best = box_iou(boxes_xyxy(anns), regions.boxes.float()).max(dim=1)
    return best.values.tolist(), best.indices.tolist()


def matched_objects(world: World, split: str, store: FeatureStore, min_iou: float = 0.5
                    ) -> tuple[torch.Tensor, Targets, int, list[tuple[str, str]]]:
    """(features [N, D] of the regions matched to ground-truth objects, their targets, unmatched objects,
    (true class, the region's own tag) of each match where the store keeps tags)."""
    inst = world.instances(split)
    reader = TargetReader(inst)
    names = {c.id: c.name for c in inst.categories}
    feats, targets, missed, labels = [], reader.empty(), 0, []
    for iid, anns in inst.annotations.items():
        if not anns:
            continue
        regions = store[iid] if iid in store else None
        if regions is None or len(regions) == 0:
            missed += len(anns)
            continue
        for a, iou, j in zip(anns, *best_regions(anns, regions)):
            if iou < min_iou:
                missed += 1
                continue
            feats.append(regions.features[j].float())
            reader.add(targets, a)
            if regions.tags:
                labels.append((names[a.category_id], regions.tags[j]))
    if not feats:
        raise SystemExit(f"no region of {store.root} overlaps an object of "
                         f"split {split!r} with IoU >= {min_iou}")
    return torch.stack(feats), targets, missed, labels


def label_report(labels: list[tuple[str, str]], sizes: list[str] | None = None, top: int = 8) -> dict:
    """The detector's own class decisions on the matched objects: accuracy overall, per class and per size,
    and the most frequent confusions (what the object tags get wrong, beside what a probe can read)."""
    right = torch.tensor([true == tag for true, tag in labels])
    confusions = Counter(f"{true} -> {tag}" for true, tag in labels if true != tag)
    report = {"accuracy": round(100 * right.float().mean().item(), 1),
              "per_class": accuracy_by(right, [true for true, _ in labels]),
              "confusions": dict(confusions.most_common(top))}
    if sizes is not None:
        report["accuracy_by_size"] = accuracy_by(right, sizes)
    return report


PATH_POINTS = ("pixels", "pooled", "fc1", "region feature")


@torch.no_grad()
def region_path(world: World, split: str, detector, max_images: int = 400) -> tuple[dict[str, torch.Tensor], Targets]:
    """Features of every ground-truth box of `split` at each point of the detector's region path."""
    from minivlm.vision.roi_head import batch_rois, image_roi_align
    from minivlm.vision.tee import letterbox, pad_to_canvas

    inst = world.instances(split)
    reader = TargetReader(inst)
    points, targets = {k: [] for k in PATH_POINTS}, reader.empty()
    head, cfg = detector.roi_head, detector.cfg
    for iid, anns in list((i, a) for i, a in inst.annotations.items() if a)[:max_images]:
        image, scale, _ = letterbox(world.image_path(split, inst.images[iid]), cfg.image_size)
        canvas = pad_to_canvas([image], cfg.image_size)
        boxes = boxes_xyxy(anns) * scale
        pooled = head.pool(detector.features(canvas), [boxes], canvas, [tuple(image.shape[1:])])
        fc1 = F.relu(head.box_head.fc1(pooled.flatten(1)))
        pixels = image_roi_align(canvas, batch_rois([boxes]), cfg.roi_size, cfg.roi_sampling_ratio)
        points["pixels"].append(pixels.flatten(1))
        points["pooled"].append(pooled.flatten(1))
        points["fc1"].append(fc1)
        points["region feature"].append(F.relu(head.box_head.fc2(fc1)))
        for a in anns:
            reader.add(targets, a)
    return {k: torch.cat(v) for k, v in points.items()}, targets


def accuracy_by(right: torch.Tensor, buckets: list[str]) -> dict[str, float]:
    """Accuracy (%) of the `right` flags [N] within each bucket name (one per object)."""
    out: dict[str, list[int]] = {}
    for r, b in zip(right.tolist(), buckets):
        out.setdefault(b, []).append(int(r))
    return {b: round(100 * sum(v) / len(v), 1) for b, v in sorted(out.items())}


def probe_rows(x_tr: torch.Tensor, t_tr: Targets, x_te: torch.Tensor, t_te: Targets,
               sizes: list[str] | None = None, **extra) -> list[dict]:
    """One row per target; with `sizes` (each held-out object's size name) also its accuracy per size."""
    rows = []
    for name in t_tr:
        y_tr, y_te = torch.tensor(t_tr[name]), torch.tensor(t_te[name])
        keep_tr, keep_te = y_tr >= 0, y_te >= 0
        if keep_tr.sum() == 0 or keep_te.sum() == 0:
            continue
        l2 = choose_l2(x_tr[keep_tr], y_tr[keep_tr])
        train_acc, pred = linear_probe(x_tr[keep_tr], y_tr[keep_tr], x_te[keep_te], l2=l2)
        right = pred == y_te[keep_te]
        majority = torch.bincount(y_te[keep_te]).max().item() / int(keep_te.sum())
        row = {**extra, "target": name, "n_train": int(keep_tr.sum()), "n_eval": int(keep_te.sum()),
               "probe_train_acc": round(100 * train_acc, 1),
               "probe_eval_acc": round(100 * right.float().mean().item(), 1), "majority_acc": round(100 * majority, 1),
               "probe_l2": l2}
        if sizes is not None:
            row["eval_acc_by_size"] = accuracy_by(right, [s for s, k in zip(sizes, keep_te.tolist()) if k])
        rows.append(row)
    return rows


def size_names(targets: Targets, attribute_names: list[str]) -> list[str] | None:
    """Each object's size name ("?" where it has none), or None in a world without a size group; the targets
    hold attribute indices into `attribute_names`."""
    if "size" not in targets:
        return None
    return [attribute_names[i] if i >= 0 else "?" for i in targets["size"]]


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def choose_l2(x: torch.Tensor, y: torch.Tensor, grid: tuple[float, ...] = L2_GRID, seed: int = 0) -> float:
    """The L2 weight of the grid whose probe, fitted on four fifths of (x, y), scores best on the last fifth.
    Unregularised, a probe on a thousand dense dimensions fits ~2,400 objects by heart and can miss a few
    dimensions that name the answer outright (the detector's decisions at the end of the demo's features)."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, fit = order[: len(y) // 5], order[len(y) // 5:]
    if len(val) == 0 or len(fit) == 0:
        return grid[0]
    scores = [(linear_probe(x[fit], y[fit], x[val], l2=l2)[1] == y[val]).float().mean().item() for l2 in grid]
    return grid[max(range(len(grid)), key=lambda i: (scores[i], i))]  # ties: the stronger regulariser


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, l2: float = 1e-4,
                 max_iter: int = 100, seed: int = 0) -> tuple[float, torch.Tensor]:
    """(train accuracy, held-out predictions) of a softmax classifier on standardised features, fitted to
    convergence (L-BFGS on cross-entropy + l2/2 |W|^2, as scikit-learn's LogisticRegression). The earlier 300
    Adam steps at lr 1e-3 stopped short: on the demo's features they read the detector's own size decision,
    stored in the features, as 88.1% where the detector's head gets 94.8 (docs/RESULTS.md)."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    n = int(y_train.max()) + 1
    probe = torch.nn.Linear(x_train.shape[1], n)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x_train), y_train) + 0.5 * l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (probe(x_train).argmax(1) == y_train).float().mean().item(), probe(x_test).argmax(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="world / COCO-style root with instances_*.json")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--features", type=Path, help="feature store of those images (`minivlm extract`)")
    what.add_argument("--detector", type=Path, help="detector folder: probe each point of its region path on "
                                                    "the ground-truth boxes instead")
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--out", type=Path, default=Path("runs/region-probe"))
    args = p.parse_args(argv)

    world = World(args.data)
    if args.detector:
        from minivlm.vision.tee import load_detector

        detector = load_detector(args.detector).eval()
        x_tr, t_tr = region_path(world, args.train_split, detector)
        x_te, t_te = region_path(world, args.eval_split, detector)
        sizes = size_names(t_te, world.instances(args.eval_split).attribute_names())
        rows = [r for point in PATH_POINTS
                for r in probe_rows(x_tr[point], t_tr, x_te[point], t_te, sizes, point=point)]
        print(f"detector {args.detector}: {len(t_tr['class'])} ground-truth boxes in {args.train_split}, "
              f"{len(t_te['class'])} in {args.eval_split}; held-out probe accuracy (%) at each point of the region path")
        names = list(t_tr)
        print(f"{'point':<16}" + "".join(f"{n:>10}" for n in names))
        for point in PATH_POINTS:
            acc = {r["target"]: r["probe_eval_acc"] for r in rows if r["point"] == point}
            print(f"{point:<16}" + "".join(f"{acc.get(n, float('nan')):>10.1f}" for n in names))
        majority = {r["target"]: r["majority_acc"] for r in rows}
        print(f"{'majority':<16}" + "".join(f"{majority.get(n, float('nan')):>10.1f}" for n in names))
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "region_path_probe.json", {"detector": str(args.detector), "data": str(args.data),
                                                         "rows": rows}, indent=1)
        print(f"wrote {args.out / 'region_path_probe.json'}")
        return 0
    store = FeatureStore(args.features)
    x_tr, t_tr, miss_tr, _ = matched_objects(world, args.train_split, store)
    x_te, t_te, miss_te, labels = matched_objects(world, args.eval_split, store)
    sizes = size_names(t_te, world.instances(args.eval_split).attribute_names())
    rows = probe_rows(x_tr, t_tr, x_te, t_te, sizes)
    print(f"region features {args.features}: {len(x_tr)} matched objects in {args.train_split} "
          f"({miss_tr} unmatched), {len(x_te)} in {args.eval_split} ({miss_te} unmatched)")
    print(f"{'target':<10} {'train n':>8} {'eval n':>7} {'probe train %':>14} {'probe eval %':>13} {'majority %':>11}")
    for r in rows:
        by = "  " + ", ".join(f"{k} {v:.1f}" for k, v in r["eval_acc_by_size"].items()) if sizes else ""
        print(f"{r['target']:<10} {r['n_train']:>8} {r['n_eval']:>7} {r['probe_train_acc']:>14.1f} "
              f"{r['probe_eval_acc']:>13.1f} {r['majority_acc']:>11.1f}{by}")
    tags = label_report(labels, sizes if sizes and len(sizes) == len(labels) else None) if labels else None
    if tags:
        print(f"the detector's own class on the {len(labels)} matched {args.eval_split} objects: "
              f"{tags['accuracy']:.1f}% (" + ", ".join(f"{c} {a:.0f}" for c, a in tags["per_class"].items()) + ")")
        print("most frequent confusions: " + ", ".join(f"{k} {n}" for k, n in tags["confusions"].items()))
        if "accuracy_by_size" in tags:
            print("the detector's own class by object size: " +
                  ", ".join(f"{k} {v:.1f}" for k, v in tags["accuracy_by_size"].items()))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "region_probe.json", {"features": str(args.features), "data": str(args.data),
                                                "unmatched": {"train": miss_tr, "eval": miss_te}, "rows": rows,
                                                "detector_labels": tags}, indent=1)
    print(f"wrote {args.out / 'region_probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
