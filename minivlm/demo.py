"""`minivlm demo`: the whole paper on the synthetic world, from nothing to `report.html`.

    make-data -> train-detector -> extract -> pretrain (MLM + ITM) -> finetune caption / vqa / nlvr2 /
    retrieval -> one model folder -> evaluate -> report.html + metrics.json

Each stage is the Python call a user would make (`train_detector(DetectorSetup(...))`, `pretrain(...)`,
`finetune(...)`, with the setups a size of configs/demo.toml gives), writes into its own sub-folder, and
leaves a `DONE.json` marker when complete. A rerun skips finished stages, and a stage that was interrupted
resumes from its last checkpoint (every trainer and the feature store are resumable), so `minivlm demo` can
be killed and restarted at any point.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from minivlm.io import read_json, write_json
from minivlm.setup_args import CONFIGS

if TYPE_CHECKING:
    from minivlm.model import MiniVLM
    from minivlm.tasks.finetune import FinetuneSetup
    from minivlm.vision.train import DetectorSetup

TASKS = ("caption", "vqa", "nlvr2", "retrieval")


@dataclass
class DemoSize:
    """How big each stage is (the sizes are configs/demo.toml). `default` fits ~25 minutes on a 2-core CPU;
    `quick` is CI-sized."""

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
    # the most-common-caption baseline within the budget (docs/RESULTS.md). "paper" keeps the paper's.
    caption_objective: str = "every-token"
    caption_mask_prob: float = 0.15
    # The word pieces the caption decoder may emit (FinetuneSetup.caption_output_vocab): those of the
    # training captions, unless a size says "all" (the paper's 30,522, half of an every-token CPU step).
    caption_output_vocab: str = "train"
    task_lr: dict[str, float] = dataclasses.field(default_factory=lambda: {"caption": 1e-3})
    # Questions cost nothing to generate: more per image (up to ~20 distinct) and more NLVR2 statements per
    # pair give VQA and NLVR2 more supervision on the same images and features. None: VQA v2's 4-6.
    questions_per_image: int | None = None
    nlvr2_statements: int = 2
    # The detector's attribute loss (one softmax per group: colour, size, texture). None: the preset's.
    detector_attribute_weight: float | None = None
    # TEEConfig fields over the preset (`train-detector --tee KEY=VALUE`): the default size pools the
    # image's pixels under each box too and keeps the attribute loss's pull on the backbone small.
    detector_tee: dict[str, Any] = dataclasses.field(default_factory=dict)
    # VQA epochs on the attribute questions alone before all of them (`finetune --curriculum-epochs`): with
    # oracle regions this took VQA from 52.8 to 57.7 in the same number of steps (docs/RESULTS.md: the oracle runs).
    vqa_curriculum_epochs: int = 0
    vqa_curriculum_yes_no: bool = False  # the curriculum takes the yes/no questions too (FinetuneSetup)
    vqa_pool: str = "cls"  # what the answer head reads (FinetuneSetup.vqa_pool)
    nlvr2_pool: str = "cls"  # what NLVR2's classifier reads of each image (FinetuneSetup.nlvr2_pool)
    region_null: bool = False  # the region-attention heads may pick "no region" (FinetuneSetup.region_null)
    # "pretrained" (the paper's order) or "random": VQA fine-tuned from random weights. A few minutes of MLM
    # + ITM teach the small transformer to answer from the tags and the question, which VQA fine-tuning
    # does not unlearn in the demo's steps (docs/RESULTS.md, VQA).
    vqa_init: str = "pretrained"
    # "pretrained" or "vqa": NLVR2 fine-tuned from this run's VQA model (an intermediate task: its counts and
    # comparisons of counts then start from a transformer that has answered questions about single images).
    nlvr2_init: str = "pretrained"
    # "pretrained" or "vqa": retrieval fine-tuned from this run's VQA model, whose transformer has learnt to bind
    # the question's words to the regions, which the demo's few minutes of pre-training do not teach (its ITM
    # against one-word swaps is at chance); the ITM head starts from random weights.
    retrieval_init: str = "pretrained"
    # bf16 autocast in the transformer stages where the CPU has bf16 units (TrainConfig.cpu_amp): ~1.6x
    # faster steps on the project's machine, spent on more epochs. Off in `quick`, whose numbers a test holds.
    cpu_amp: bool = False
    report_images: int = 8
    retrieval_eval_images: int = 40  # x 5 captions each: 8,000 pairs, each a full transformer pass

    def __post_init__(self):
        if self.vqa_init not in ("pretrained", "random"):
            raise ValueError(f"vqa_init must be 'pretrained' or 'random' (got {self.vqa_init!r})")
        for task in ("nlvr2", "retrieval"):
            if (start := getattr(self, f"{task}_init")) not in ("pretrained", "vqa"):
                raise ValueError(f"{task}_init must be 'pretrained' or 'vqa' (got {start!r})")

    def detector_setup(self, data: Path, out: Path, seed: int) -> DetectorSetup:
        from minivlm.vision.train import DETECTOR_RECIPE, DetectorSetup

        # AdamW converges in a few hundred CPU steps from scratch; the paper's SGD + cosine recipe
        # (train-detector's default) needs far longer schedules.
        train = dataclasses.replace(DETECTOR_RECIPE, epochs=self.detector_epochs, lr=self.detector_lr,
                                    optimizer="adamw", weight_decay=1e-4, seed=seed)
        return DetectorSetup(out=out, data=data, preset=self.detector_preset, image_size=self.detector_image_size,
                             attribute_loss_weight=self.detector_attribute_weight, tee=dict(self.detector_tee),
                             eval_split="test", train=train)

    def finetune_setup(self, task: str, *, epochs: int | None = None, batch_size: int | None = None, seed: int = 0,
                       **fields) -> FinetuneSetup:
        """This size's recipe for `task` (the ablation benchmark shares it, with its own epochs and batch);
        `fields` set the rest of the FinetuneSetup (data, features, out, ...)."""
        from minivlm.tasks.finetune import FinetuneSetup, task_train_config

        train = dataclasses.replace(task_train_config(task), epochs=epochs or self.task_epochs[task],
                                    batch_size=batch_size or self.task_batch, seed=seed, cpu_amp=self.cpu_amp)
        if task in self.task_lr:
            train = dataclasses.replace(train, lr=self.task_lr[task], warmup_steps=30)
        if task == "caption":
            fields.update(caption_objective=self.caption_objective, caption_mask_prob=self.caption_mask_prob,
                          caption_output_vocab=self.caption_output_vocab)
        if task == "vqa":
            fields.update(curriculum_epochs=self.vqa_curriculum_epochs, curriculum_yes_no=self.vqa_curriculum_yes_no,
                          vqa_pool=self.vqa_pool, region_null=self.region_null)
        if task == "nlvr2":
            fields.update(nlvr2_pool=self.nlvr2_pool, region_null=self.region_null)
        return FinetuneSetup(task=task, train=train, **fields)


def load_sizes(path: Path = CONFIGS / "demo.toml") -> dict[str, DemoSize]:
    return {name: DemoSize(**values) for name, values in tomllib.loads(path.read_text()).items()}


SIZES: dict[str, DemoSize] = load_sizes()


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
    drop_resume_checkpoints(folder)
    say(f"[{prefix}] {name}: finished in {info['seconds']:.0f} s")
    return info


def drop_resume_checkpoints(folder: Path) -> None:
    """Deletes the trainers' resume checkpoints under a finished stage's folder (also in sub-stages such as
    caption/ce and vqa/curriculum). Its marker means it is never resumed, so they are only disk: weights and
    optimiser state, half of what a demo leaves (1 GB of 2 in the tests' demo), and in a full ablation run's
    18 transformer runs and 5 detectors enough to fill a 60 GB disk."""
    for pointer in sorted(folder.rglob("checkpoint/latest")):  # the Trainer's layout, nothing else
        shutil.rmtree(pointer.parent, ignore_errors=True)


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
        from minivlm.data.synthetic import generate_world

        s = self.size
        generate_world(self.world, s.images, self.seed, s.unlabeled, s.nlvr2_pairs,
                       questions_per_image=s.questions_per_image, nlvr2_statements=s.nlvr2_statements)
        return read_json(self.world / "world.json")

    def train_detector(self) -> dict:
        from minivlm.vision.train import train_detector

        train_detector(self.size.detector_setup(self.world, self.detector, self.seed))
        return _maybe_json(self.detector / "metrics.json")

    def extract(self) -> dict:
        from minivlm.vision.extract import extract

        extract(self.detector, self.features, data=self.world)
        extract(self.detector, self.nlvr2_features, images=self.world / "nlvr2" / "images")
        return {}

    def pretrain_stage(self) -> dict:
        from minivlm.config import PretrainTaskConfig, TrainConfig
        from minivlm.tasks.pretrain import PretrainSetup, pretrain

        s = self.size
        pretrain(PretrainSetup(
            data=self.world, features=self.features, out=self.pretrain, preset=s.bert_preset, tags="store",
            # As many question texts as captions per image, however many questions the world asks: more
            # would crowd the captions out of the corpus (and lengthen the epochs).
            vqa_per_image=5,
            # From scratch, MLM swamps the shared gradient and ITM stays at chance with OSCAR's weight 1.
            task=PretrainTaskConfig(itm_weight=5.0),
            train=TrainConfig(epochs=s.pretrain_epochs, batch_size=s.pretrain_batch, lr=4e-4, seed=self.seed,
                              cpu_amp=s.cpu_amp)))
        return _maybe_json(self.pretrain / "result.json")

    def finetune(self, task: str) -> dict:
        from minivlm.tasks.finetune import finetune

        # One held-out split per task (the report reads the test split); retrieval scores every image x
        # caption pair with a full transformer pass, so its test set is capped at `retrieval_eval_images`.
        finetune(self.size.finetune_setup(
            task, data=self.world, features=self.features, out=self.out / task, pretrained=self.starts_from(task),
            preset=self.size.bert_preset, seed=self.seed, eval_splits=["test1" if task == "nlvr2" else "test"],
            nlvr2_features=self.nlvr2_features if task == "nlvr2" else None,
            max_eval=self.size.retrieval_eval_images if task == "retrieval" else None))
        return read_json(self.out / task / "metrics.json")

    def starts_from(self, task: str) -> Path | None:
        """The folder `task` is fine-tuned from (None: random weights)."""
        if task == "vqa" and self.size.vqa_init == "random":
            return None
        if task in ("nlvr2", "retrieval") and getattr(self.size, f"{task}_init") == "vqa":
            return self.out / "vqa"  # TASKS runs VQA before NLVR2 and retrieval
        return self.pretrain / "model"

    def assemble(self) -> dict:
        from minivlm.export import export_model
        from minivlm.model import MiniVLM

        model = MiniVLM.assemble(self.detector, {t: self.out / t for t in TASKS})
        model.save_pretrained(self.model)
        # Its graphs beside it, so `minivlm caption MODEL ...` and `MiniVLM.from_pretrained` take the fast path.
        export_model(self.model)
        return {"tasks": list(TASKS), "onnx": str(self.model / "onnx"), **self.check_graphs(model)}

    def check_graphs(self, model: MiniVLM, images: int = 8) -> dict:
        """The exported graphs caption the first test images as PyTorch does, token for token: the fast path is
        what `minivlm caption MODEL` runs, so a graph that fails or drifts must stop the demo here (a detector
        graph once failed on every image that had no box on one pyramid level, and no stage noticed)."""
        from minivlm.data.world import World
        from minivlm.errors import MiniVLMError
        from minivlm.model import MiniVLM

        world = World(self.world)
        caps = world.captions("test")
        paths = [world.image_path("test", caps.images[i]) for i in sorted(caps.images)[:images]]
        torch_caps = model.caption(paths)
        try:
            onnx_caps = MiniVLM.from_pretrained(self.model, backend="onnx").caption(paths)
        except Exception as err:  # onnxruntime's own errors: one line, not its traceback
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MiniVLMError(f"{self.model / 'onnx'}: the exported graphs fail on test images: {first}") from None
        if onnx_caps != torch_caps:
            raise MiniVLMError(f"{self.model / 'onnx'}: the exported graphs caption "
                               f"{sum(a != b for a, b in zip(onnx_caps, torch_caps))} of {len(paths)} test images "
                               "differently from PyTorch")
        return {"graphs_checked_on_images": len(paths)}

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
