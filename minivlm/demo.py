"""`minivlm demo`: the whole paper on the synthetic world, from nothing to `report.html`.

    make-data -> train-detector -> extract -> pretrain (MLM + ITM) -> finetune caption / vqa / nlvr2 /
    retrieval -> one model folder -> evaluate -> report.html + metrics.json

Each stage is the same `minivlm` command a user would type (run in-process through `cli.invoke`), writes
into its own sub-folder, and leaves a `DONE.json` marker when complete. A rerun skips finished stages, and
a stage that was interrupted resumes from its last checkpoint (every trainer and the feature store are
resumable), so `minivlm demo` can be killed and restarted at any point.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from minivlm.cli import invoke
from minivlm.io import read_json, write_json

TASKS = ("caption", "vqa", "nlvr2", "retrieval")


@dataclass
class DemoSize:
    """How big each stage is. `default` fits ~25 minutes on a 2-core CPU; `quick` is CI-sized."""

    images: int
    unlabeled: int
    nlvr2_pairs: int
    detector_preset: str
    detector_image_size: int
    detector_epochs: int
    detector_lr: float
    bert_preset: str
    pretrain_epochs: int
    pretrain_batch: int
    task_epochs: dict[str, int]
    task_batch: int
    scst_steps: int
    # Not the paper's fine-tuning (15% masking at lr 1e-4, from a model pre-trained for days): from a few
    # minutes of pre-training, predicting every caption token per step at a higher lr is what gets past
    # the most-common-caption baseline within the budget (README: Results). "paper" keeps the paper's.
    caption_objective: str = "every-token"
    caption_mask_prob: float = 0.15
    task_lr: dict[str, float] = dataclasses.field(default_factory=lambda: {"caption": 1e-3})
    # Questions cost nothing to generate: more per image (up to ~20 distinct) and more NLVR2 statements per
    # pair give VQA and NLVR2 more supervision on the same images and features. None: VQA v2's 4-6.
    questions_per_image: int | None = None
    nlvr2_statements: int = 2
    # The detector's attribute loss (one softmax per group: colour, size, texture). None: the preset's.
    detector_attribute_weight: float | None = None
    # VQA epochs on the attribute questions alone before all of them (`finetune --curriculum-epochs`): with
    # oracle regions this took VQA from 52.8 to 57.7 in the same number of steps (README: Grounding).
    vqa_curriculum_epochs: int = 0
    report_images: int = 8
    retrieval_eval_images: int = 40  # x 5 captions each: 8,000 pairs, each a full transformer pass

    def recipe_args(self, task: str) -> list:
        """`minivlm finetune` flags of this size's recipe for `task` (the ablation benchmark shares them)."""
        args: list = []
        if task == "caption":
            args += ["--caption-objective", self.caption_objective, "--mask-prob", self.caption_mask_prob]
        if task in self.task_lr:
            args += ["--lr", self.task_lr[task], "--warmup-steps", 30]
        if task == "vqa" and self.vqa_curriculum_epochs:
            args += ["--curriculum-epochs", self.vqa_curriculum_epochs]
        return args


SIZES: dict[str, DemoSize] = {
    "quick": DemoSize(images=48, unlabeled=0, nlvr2_pairs=24, detector_preset="tee-demo", detector_image_size=192,
                      detector_epochs=2, detector_lr=0.002, bert_preset="bert-demo",
                      pretrain_epochs=1, pretrain_batch=16,
                      task_epochs={"caption": 2, "vqa": 2, "nlvr2": 2, "retrieval": 1}, task_batch=16,
                      scst_steps=0, questions_per_image=8, nlvr2_statements=4, report_images=4,
                      vqa_curriculum_epochs=1),
    # ~25 minutes on 2 idle cores (measured: see the README's Results). Detector: with one attribute softmax
    # per group, lr 4e-3 and attribute weight 0.25 gave mAP@0.5 0.67 and colour 53% in a linear probe
    # (lr 2e-3 at 0.5: 0.30 / 95%; 4e-3 at 0.6: 0.43; the single softmax at 2e-3: 0.56 / 38%). Captioning gets 8 epochs (at 4 its
    # CIDEr margin over the most common caption was 1 to 11 points across runs, at 8 it is 11 to 16) and
    # retrieval 6 (at 2 the matching loss had barely moved and R@1 was at or near chance).
    "default": DemoSize(images=800, unlabeled=0, nlvr2_pairs=300, detector_preset="tee-demo",
                        detector_image_size=256, detector_epochs=5, detector_lr=0.004, detector_attribute_weight=0.25,
                        bert_preset="bert-demo", pretrain_epochs=4, pretrain_batch=32,
                        task_epochs={"caption": 8, "vqa": 4, "nlvr2": 6, "retrieval": 6}, task_batch=32,
                        scst_steps=0, questions_per_image=12, nlvr2_statements=4, vqa_curriculum_epochs=5),
    # The default's models with more supervision and steps for the tasks that need them (~45 minutes here):
    # 20 questions per image, 4x the NLVR2 pairs with 6 statements each, longer VQA / NLVR2 / retrieval.
    "long": DemoSize(images=800, unlabeled=0, nlvr2_pairs=1200, detector_preset="tee-demo",
                     detector_image_size=256, detector_epochs=5, detector_lr=0.004, detector_attribute_weight=0.25,
                     bert_preset="bert-demo", pretrain_epochs=4, pretrain_batch=32,
                     task_epochs={"caption": 8, "vqa": 8, "nlvr2": 10, "retrieval": 8}, task_batch=32,
                     scst_steps=0, questions_per_image=20, nlvr2_statements=6, vqa_curriculum_epochs=5),
    # The paper's shapes (TEE-0 + MiniLM 12/384/1536) on the same world: the point is the architecture,
    # not the scale; see the README for how long it takes here.
    "paper": DemoSize(images=800, unlabeled=0, nlvr2_pairs=300, detector_preset="tee0", detector_image_size=256,
                      detector_epochs=6, detector_lr=0.002, bert_preset="minilm",
                      pretrain_epochs=4, pretrain_batch=32,
                      task_epochs={"caption": 8, "vqa": 8, "nlvr2": 8, "retrieval": 3}, task_batch=32,
                      scst_steps=0, caption_objective="masked", task_lr={}),
}


def stage(name: str, folder: Path, fn: Callable[[], dict | None], say: Callable[[str], None] = print,
          prefix: str = "demo") -> dict:
    """Runs `fn` unless `folder/DONE.json` says it already ran; records what it returned and its time."""
    marker = folder / "DONE.json"
    if marker.is_file():
        say(f"[{prefix}] {name}: done already ({marker}), skipping")
        return read_json(marker)
    say(f"[{prefix}] {name} ...")
    t0 = time.time()
    info = fn() or {}
    info = {"stage": name, "seconds": round(time.time() - t0, 1), **info}
    write_json(marker, info, indent=1)
    say(f"[{prefix}] {name}: finished in {info['seconds']:.0f} s")
    return info


class Demo:
    def __init__(self, out: Path, size: DemoSize, seed: int = 0, say: Callable[[str], None] = print):
        self.out, self.size, self.seed, self.say = out, size, seed, say
        self.world = out / "world"
        self.detector = out / "detector"
        self.features = out / "features"
        self.nlvr2_features = out / "features_nlvr2"
        self.pretrain = out / "pretrain"
        self.model = out / "model"

    def stage(self, name: str, folder: Path, fn: Callable[[], dict | None]) -> dict:
        return stage(name, folder, fn, self.say)

    # -- stages -------------------------------------------------------------------------------------
    def make_data(self) -> dict:
        s = self.size
        more = ["--questions-per-image", s.questions_per_image] if s.questions_per_image else []
        invoke("make-data", self.world, "--images", s.images, "--seed", self.seed, "--unlabeled", s.unlabeled,
               "--nlvr2-pairs", s.nlvr2_pairs, "--nlvr2-statements", s.nlvr2_statements, *more)
        return read_json(self.world / "world.json")

    def train_detector(self) -> dict:
        s = self.size
        invoke("train-detector", "--data", self.world, "--out", self.detector, "--preset", s.detector_preset,
               "--image-size", s.detector_image_size, "--epochs", s.detector_epochs, "--seed", self.seed,
               # AdamW converges in a few hundred CPU steps from scratch; the paper's SGD + cosine recipe
               # (train-detector's default) needs far longer schedules.
               "--optimizer", "adamw", "--lr", s.detector_lr, "--weight-decay", 1e-4, "--eval-split", "test",
               *(["--attribute-loss-weight", s.detector_attribute_weight] if s.detector_attribute_weight else []))
        return _maybe_json(self.detector / "metrics.json")

    def extract(self) -> dict:
        invoke("extract", "--detector", self.detector, "--data", self.world, "--out", self.features)
        invoke("extract", "--detector", self.detector, "--images", self.world / "nlvr2" / "images",
               "--out", self.nlvr2_features)
        return {}

    def pretrain_stage(self) -> dict:
        s = self.size
        invoke("pretrain", "--data", self.world, "--features", self.features, "--out", self.pretrain,
               "--preset", s.bert_preset, "--epochs", s.pretrain_epochs, "--batch-size", s.pretrain_batch,
               "--seed", self.seed, "--tags", "store",
               # From scratch, MLM swamps the shared gradient and ITM stays at chance with OSCAR's weight 1.
               "--itm-weight", 5,
               # As many question texts as captions per image, however many questions the world asks: more
               # would crowd the captions out of the corpus (and lengthen the epochs).
               "--vqa-per-image", 5)
        return _maybe_json(self.pretrain / "result.json")

    def finetune(self, task: str) -> dict:
        s = self.size
        args = ["--task", task, "--data", self.world, "--features", self.features, "--out", self.out / task,
                "--pretrained", self.pretrain / "model", "--preset", s.bert_preset, "--epochs",
                s.task_epochs[task], "--batch-size", s.task_batch, "--seed", self.seed]
        # One held-out split per task (the report reads the test split); retrieval scores every image x
        # caption pair with a full transformer pass, so its test set is capped at `retrieval_eval_images`.
        args += ["--eval-split", "test1" if task == "nlvr2" else "test"]
        if task == "nlvr2":
            args += ["--nlvr2-features", self.nlvr2_features]
        if task == "retrieval":
            args += ["--max-eval", s.retrieval_eval_images]
        invoke("finetune", *args, *s.recipe_args(task))
        return read_json(self.out / task / "metrics.json")

    def assemble(self) -> dict:
        from minivlm.model import MiniVLM

        model = MiniVLM.assemble(self.detector, {t: self.out / t for t in TASKS})
        model.save_pretrained(self.model)
        return {"tasks": list(TASKS)}

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "demo_config.json", {"seed": self.seed, **dataclasses.asdict(self.size)}, indent=1)
        stages = {
            "data": self.stage("make-data", self.world, self.make_data),
            "detector": self.stage("train-detector", self.detector, self.train_detector),
            "features": self.stage("extract", self.features, self.extract),
            "pretrain": self.stage("pretrain", self.pretrain, self.pretrain_stage),
        }
        for task in TASKS:
            stages[task] = self.stage(f"finetune {task}", self.out / task, lambda t=task: self.finetune(t))
        stages["model"] = self.stage("model folder", self.model, self.assemble)
        from minivlm.demo_report import write_report

        metrics = self.stage("report", self.out / "report", lambda: write_report(self, stages))
        return metrics


def _maybe_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--size", choices=list(SIZES), default="default",
                        help="default: demo presets, ~25 min on 2 CPU cores; quick: toy size for CI; long: "
                             "more questions, NLVR2 pairs and fine-tuning steps (~45 min); paper: TEE-0 + MiniLM shapes")
    parser.add_argument("--quick", action="store_true", help="same as --size quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else args.size]
    t0 = time.time()
    Demo(args.out, size, args.seed).run()
    print(f"[demo] all stages done in {time.time() - t0:.0f} s; open {args.out / 'report.html'}")
    return 0
