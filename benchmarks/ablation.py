"""The paper's ablations in miniature, on the synthetic world (Tables 3 and 9, and the large-vs-small claim).

    python benchmarks/ablation.py [--out runs/ablation] [--seeds 0 1] [--quick]

Everything is scaled down to CPU minutes (see SIZES) and run through the same Python calls a user would
make (`train_detector`, `pretrain`, `finetune` with their setups). Every finished step leaves a DONE.json, so a killed run continues where it stopped.

  Detectors    small   tee-demo trained on the world                               (TEE-0's role)
               O       tee-demo trained first on a 2x larger, separately generated
                       detection world, then fine-tuned on the world with --init   (+Objects365 before VG)
               strong  tee-demo-large (TEE-1's shape) with the same two-step chain (TEE-3's role: tagger)
  Transformer  minilm-l3: MiniLM's width (384/1536/12 heads), 3 layers; "text" rows start from the first
               three layers of the real MiniLM-L6 checkpoint (the paper's MiniLM init, ref. [59]).
  Table 3      baseline / +O / +O+H (strong tags in pre-training) / +O+H+DD (plus unlabeled images
               pseudo-captioned by a larger teacher), each: pretrain -> finetune caption, VQA; text init.
  Table 9      tags none / small-TEE / strong-TEE  x  text-pretrained / random init, on the O extractor's
               features (the text rows with tags are Table 3's +O and +O+H runs, not run twice).
  Large/small  strong extractor + bert-demo-large (6/512/2048)  vs  O extractor + minilm-l3, both from
               random weights, pre-trained with the strong tags, fine-tuned the same way.

Fine-tuning (the demo's recipe: captioning with every-token prediction at lr 1e-3) and inference always use
the small extractor's own features and tags; the strong tagger and the teacher are used only offline, as in
the paper. Prints tables and writes OUT/ablation.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minivlm.config import PretrainTaskConfig, TrainConfig  # noqa: E402
from minivlm.data.synthetic import generate_world  # noqa: E402
from minivlm.demo import SIZES as DEMO_SIZES, stage  # noqa: E402
from minivlm.io import read_json, write_json  # noqa: E402
from minivlm.tasks.finetune import finetune  # noqa: E402
from minivlm.tasks.pretrain import PretrainSetup, pretrain  # noqa: E402
from minivlm.vision.extract import extract  # noqa: E402
from minivlm.vision.train import DetectorSetup, train_detector  # noqa: E402

DEMO_RECIPE = DEMO_SIZES["default"]  # fine-tuning recipe (objective, lr, curriculum) as the demo: see minivlm.demo


@dataclass
class Size:
    images: int
    detection_images: int  # the larger detection set used for the "+O" chain
    unlabeled: int
    detector_epochs: int  # from scratch on the world
    chain_epochs: int  # each step of a two-step chain (larger detection world first, then the world)
    pretrain_epochs: int
    caption_epochs: int
    vqa_epochs: int
    batch: int


SIZES = {
    "quick": Size(images=40, detection_images=60, unlabeled=12, detector_epochs=1, chain_epochs=1,
                  pretrain_epochs=1, caption_epochs=1, vqa_epochs=1, batch=16),
    # ~67 minutes on 2 idle AVX512 cores, ~94 on AVX2-only ones: 5 detectors at 192 px (~250-320 steps each:
    # fewer leave TEE untrained), then 18 transformer runs (pre-training, captioning, VQA) of ~90-200 steps each.
    "default": Size(images=200, detection_images=400, unlabeled=200, detector_epochs=14, chain_epochs=5,
                    pretrain_epochs=2, caption_epochs=4, vqa_epochs=3, batch=32),
}


class Ablation:
    def __init__(self, out: Path, size: Size, seeds: list[int]):
        self.out, self.size, self.seeds = out, size, seeds
        self.world, self.det_world = out / "world", out / "world_detection"
        self.partial: dict[str, dict] = {}

    def step(self, name: str, folder: Path, fn) -> dict:
        return stage(name, folder, fn, prefix="ablation")  # which also drops the finished step's checkpoints

    # -- data and detectors -------------------------------------------------------------------------
    def data(self) -> None:
        s = self.size
        self.step("world", self.world, lambda: generate_world(self.world, s.images, 0, s.unlabeled) and None)
        self.step("detection world", self.det_world,
                  lambda: generate_world(self.det_world, s.detection_images, 1000) and None)

    def detector(self, name: str, preset: str, chain: bool) -> Path:
        folder = self.out / f"det_{name}"

        def setup(data: Path, out: Path, epochs: int, init: Path | None = None) -> DetectorSetup:
            # the demo's detector setup (its TEE options, attribute loss and optimiser, so the features end in
            # the region label code as the demo's do) at a smaller canvas, a lower lr and this benchmark's epochs
            demo = DEMO_RECIPE.detector_setup(data, out, seed=0)
            return replace(demo, preset=preset, image_size=192, init=init,
                           train=replace(demo.train, epochs=epochs, lr=0.002))

        if chain:
            pre, half = self.out / f"det_{name}_pre", self.size.chain_epochs
            self.step(f"detector {name} (larger set first)", pre,
                      lambda: train_detector(setup(self.det_world, pre, half)) and None)
            self.step(f"detector {name}", folder,
                      lambda: _detector_metrics(train_detector(setup(self.world, folder, half, init=pre)), folder))
        else:
            self.step(f"detector {name}", folder, lambda: _detector_metrics(
                train_detector(setup(self.world, folder, self.size.detector_epochs)), folder))
        return folder

    def features(self, det: Path, name: str, images: Path | None = None) -> Path:
        store = self.out / f"features_{name}"
        where = {"images": images} if images else {"data": self.world}
        self.step(f"extract {name}", store, lambda: extract(det, store, **where) and None)
        return store

    # -- one transformer run: pretrain -> caption + VQA -------------------------------------------------
    def run(self, name: str, seed: int, features: Path, preset: str = "minilm-l3", tags: str = "store",
            tag_store: Path | None = None, init_text: Path | None = None, extra: dict | None = None) -> dict:
        root = self.out / "runs" / f"{name}-s{seed}"
        pre = root / "pretrain"
        setup = PretrainSetup(data=self.world, features=features, out=pre, preset=preset, tags=tags,
                              tag_store=tag_store, init_text=init_text, **(extra or {}),
                              task=PretrainTaskConfig(itm_weight=5.0),  # as the demo
                              train=TrainConfig(epochs=self.size.pretrain_epochs, batch_size=self.size.batch,
                                                lr=4e-4, seed=seed))
        self.step(f"{name} seed {seed}: pretrain", pre, lambda: pretrain(setup) and None)
        result = {}
        for task, epochs in (("caption", self.size.caption_epochs), ("vqa", self.size.vqa_epochs)):
            ft = root / task
            info = self.step(f"{name} seed {seed}: {task}", ft, lambda t=task, ft=ft, e=epochs: _task_metric(
                finetune(DEMO_RECIPE.finetune_setup(t, epochs=e, batch_size=self.size.batch, seed=seed,
                                                    data=self.world, features=features, out=ft,
                                                    pretrained=pre / "model", preset=preset)), ft, t))
            result.update({k: v for k, v in info.items() if k in ("CIDEr", "vqa_acc", "params_m")})
        return result

    def repeat(self, name: str, **kw) -> dict:
        runs = [self.run(name, seed, **kw) for seed in self.seeds]
        row = {"runs": runs, **{k: _mean_std([r[k] for r in runs]) for k in ("CIDEr", "vqa_acc")}}
        self.partial[name] = row  # rows so far, in case the whole table is cut short
        write_json(self.out / "ablation_partial.json", self.partial, indent=1)
        return row

    # -- the tables -------------------------------------------------------------------------------------
    def all(self) -> dict:
        t0 = time.time()
        self.data()
        det_small = self.detector("small", "tee-demo", chain=False)
        det_o = self.detector("O", "tee-demo", chain=True)
        det_strong = self.detector("strong", "tee-demo-large", chain=True)
        f_small, f_o, f_strong = (self.features(d, n) for d, n in
                                  ((det_small, "small"), (det_o, "O"), (det_strong, "strong")))
        detectors = {n: read_json(self.out / f"det_{n}" / "DONE.json").get("map50") for n in ("small", "O", "strong")}

        from minivlm.text.tokenizer import minilm_checkpoint_path

        text = minilm_checkpoint_path()
        # Large model (also the data-distillation teacher): strong extractor + larger transformer.
        large = self.repeat("large", features=f_strong, preset="bert-demo-large", tag_store=f_strong)
        teacher = self.out / "teacher"
        first = self.out / "runs" / f"large-s{self.seeds[0]}"
        self.step("teacher model folder", teacher, lambda: _assemble(det_strong, first / "caption", teacher))
        pseudo = self.out / "pseudo_captions.json"
        self.step("distill", self.out / "distill", lambda: _distill(teacher, self.world / "unlabeled", pseudo))
        unl_o = self.features(det_o, "unlabeled_O", self.world / "unlabeled")
        unl_strong = self.features(det_strong, "unlabeled_strong", self.world / "unlabeled")

        table3 = {
            "baseline": self.repeat("baseline", features=f_small, init_text=text),
            "+O": self.repeat("O", features=f_o, init_text=text),
            "+O+H": self.repeat("O_H", features=f_o, tag_store=f_strong, init_text=text),
            "+O+H+DD": self.repeat("O_H_DD", features=f_o, tag_store=f_strong, init_text=text, extra=dict(
                extra_captions=pseudo, extra_features=unl_o, extra_tag_store=unl_strong)),
        }
        table9 = {
            "text / no tag": self.repeat("t9_text_none", features=f_o, tags="none", init_text=text),
            "text / small TEE": table3["+O"],
            "text / strong TEE": table3["+O+H"],
            "random / no tag": self.repeat("t9_random_none", features=f_o, tags="none"),
            "random / small TEE": self.repeat("t9_random_small", features=f_o),
            "random / strong TEE": self.repeat("t9_random_strong", features=f_o, tag_store=f_strong),
        }
        small = table9["random / strong TEE"]  # trained as `large` is: random weights, strong tags
        comparison = _large_vs_small(large, small)
        report = {"size": asdict(self.size), "seeds": self.seeds, "detector_map50": detectors, "table3": table3,
                  "table9": table9, "large": large, "large_vs_small": comparison,
                  "minutes": round((time.time() - t0) / 60, 1)}
        write_json(self.out / "ablation.json", report, indent=1)
        print(format_report(report))
        return report


def _distill(teacher: Path, images: Path, out: Path) -> dict:
    from minivlm.model import MiniVLM
    from minivlm.tasks.distill import distill

    distill(MiniVLM.from_pretrained(teacher), images, out, teacher_name=str(teacher))
    return {}


def _detector_metrics(_, folder: Path) -> dict:
    metrics = read_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else {}
    return {"map50": (metrics.get("eval") or metrics).get("map50")}


def _task_metric(_, folder: Path, task: str) -> dict:
    m = read_json(folder / "metrics.json")
    e = m["eval"].get("test") or next(iter(m["eval"].values()))
    params = sum(v for v in [m.get("params_m")] if v)
    if task == "caption":
        return {"CIDEr": 100 * e["model"]["CIDEr"], "params_m": params or None}
    return {"vqa_acc": e["accuracy"]}


def _assemble(detector: Path, caption_folder: Path, out: Path) -> dict:
    from minivlm.model import MiniVLM

    MiniVLM.assemble(detector, {"caption": caption_folder}).save_pretrained(out)
    return {}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _large_vs_small(large: dict, small: dict) -> dict:
    from minivlm.config import get_bert
    from minivlm.fusion.cost import fusion_cost
    from minivlm.vision.cost import tee_cost_rows

    # Counted as `minivlm cost` counts (Visual Genome-sized heads, 300 proposals), at the demo's canvas and
    # the demo transformer's lengths (20 regions, 24 text tokens).
    out = {}
    for name, tee, bert in (("large", "tee-demo-large", "bert-demo-large"), ("small", "tee-demo", "minilm-l3")):
        total = next(r for r in tee_cost_rows(tee) if r.component == "total")
        cfg = get_bert(bert)
        params, macs = fusion_cost(cfg, cfg.max_regions, cfg.max_text_len)
        out[name] = {"extractor": tee, "transformer": bert, "params_m": total.params_m + params / 1e6,
                     "gflops": total.gflops + macs / 1e9}
    out["retained_CIDEr_%"] = 100 * small["CIDEr"]["mean"] / max(1e-9, large["CIDEr"]["mean"])
    out["retained_VQA_%"] = 100 * small["vqa_acc"]["mean"] / max(1e-9, large["vqa_acc"]["mean"])
    out["params_%"] = 100 * out["small"]["params_m"] / out["large"]["params_m"]
    out["flops_%"] = 100 * out["small"]["gflops"] / out["large"]["gflops"]
    return out


def _fmt(ms: dict) -> str:
    return f"{ms['mean']:6.2f} ± {ms['std']:5.2f}"


def format_report(r: dict) -> str:
    lines = ["detector mAP@0.5 (test): " + ", ".join(f"{k} {v:.3f}" for k, v in r["detector_map50"].items() if v is not None),
             "", "Table 3 (structure), mean ± std over seeds " + str(r["seeds"]),
             f"{'row':<12} {'CIDEr':>16} {'VQA acc':>16}"]
    for name, row in r["table3"].items():
        lines.append(f"{name:<12} {_fmt(row['CIDEr']):>16} {_fmt(row['vqa_acc']):>16}")
    lines += ["", "Table 9 (structure): init / tags", f"{'row':<22} {'CIDEr':>16} {'VQA acc':>16}"]
    for name, row in r["table9"].items():
        lines.append(f"{name:<22} {_fmt(row['CIDEr']):>16} {_fmt(row['vqa_acc']):>16}")
    c = r["large_vs_small"]
    lines += ["", "Large vs small",
              f"large {c['large']['extractor']} + {c['large']['transformer']}: {c['large']['params_m']:.1f} M params, "
              f"{c['large']['gflops']:.2f} GFLOPs; CIDEr {_fmt(r['large']['CIDEr'])}, VQA {_fmt(r['large']['vqa_acc'])}",
              f"small {c['small']['extractor']} + {c['small']['transformer']}: {c['small']['params_m']:.1f} M params, "
              f"{c['small']['gflops']:.2f} GFLOPs",
              f"small retains {c['retained_CIDEr_%']:.0f}% CIDEr and {c['retained_VQA_%']:.0f}% VQA accuracy with "
              f"{c['params_%']:.0f}% of the parameters and {c['flops_%']:.0f}% of the FLOPs"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--quick", action="store_true", help="toy sizes (a smoke test of the whole benchmark)")
    args = p.parse_args(argv)
    if len(args.seeds) < 2 and not args.quick:
        p.error("mean ± std needs at least 2 seeds")
    Ablation(args.out, SIZES["quick" if args.quick else "default"], args.seeds).all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
