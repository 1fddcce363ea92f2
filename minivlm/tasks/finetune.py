"""`minivlm finetune`: one pre-trained checkpoint -> one task (caption, VQA, NLVR2 or retrieval).

    minivlm finetune --task vqa --pretrained PRE/model --data WORLD --features STORE --out DIR

Starts from a pre-trained folder (`minivlm pretrain` output, or a text-only BERT/MiniLM folder; random
weights of `--preset` without one), trains with the one Trainer (resumes after a kill: rerun the same
command), then evaluates on the held-out splits. The output folder:

    config.json          {"kind": "task", "version", "config": {"task", "bert", ...}} (`minivlm.checkpoint`)
    model.safetensors    the task transformer + head (what `MiniVLM.assemble` takes)
    vocab.txt            WordPiece vocabulary; answers.txt for VQA
    results_{split}.json official result formats: VQA [{"question_id", "answer"}], NLVR2 [{"identifier",
                         "prediction"}], retrieval {"scores", "text_to_image", "image_ids", "texts"}
    metrics.json         per split: the task's detail plus {"metrics": {..}, "baselines": {..}} (one shape)
    log.jsonl, checkpoint/, train_config.json, init_report.txt

One driver, `finetune(setup)`, runs every task through the `Task` protocol (minivlm/tasks/task.py; the
implementations live in their task modules, named by `minivlm.tasks.registry.TASKS`). Captioning trains
through its own `train_caption` (cross-entropy, then optional SCST), called from its task's `fit`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from tqdm.auto import tqdm

from minivlm.config import BERT_PRESETS, CAPTION_OBJECTIVES, CAPTION_OUTPUT_VOCABS, BertConfig, CaptionTaskConfig, RetrievalTaskConfig, TrainConfig, VQATaskConfig
from minivlm.errors import MiniVLMError
from minivlm.io import atomic_path, write_json, write_text
from minivlm.tasks.data import TASKS, init_from_pretrained, task_bert_config
from minivlm.tasks.nlvr2 import NLVR2_POOLS
from minivlm.tasks.vqa import VQA_POOLS
from minivlm.text.tokenizer import Tokenizer, get_tokenizer
from minivlm.setup_args import add_setup_arguments, option, setup_from_args
from minivlm.train.trainer import Trainer, distributed_env, read_log

# Per-task defaults at the synthetic world's scale (the paper's real-data recipes are far longer).
DEFAULT_LR = {"caption": 1e-4, "vqa": 2e-4, "nlvr2": 2e-4, "retrieval": 3e-4}
DEFAULT_EPOCHS = {"caption": 10, "vqa": 10, "nlvr2": 20, "retrieval": 20}


def task_train_config(task: str) -> TrainConfig:
    """A task's trainer at the synthetic world's scale (the real-data recipes are configs/finetune.toml)."""
    return TrainConfig(epochs=DEFAULT_EPOCHS[task], lr=DEFAULT_LR[task], batch_size=32)


@dataclass
class FinetuneSetup:
    """Everything a task's fine-tuning needs; the `minivlm finetune` flags are generated from it."""

    RECIPES: ClassVar[str] = "finetune"  # configs/finetune.toml

    task: str = option(help="the task to fine-tune", choices=TASKS)
    data: Path = option(help="dataset root (annotations/, vqa/, nlvr2/)")
    features: Path = option(help="feature store of the COCO-style images (`minivlm extract`)")
    out: Path = option(help="output folder")
    pretrained: Path | None = option(None, help="pre-trained folder (`minivlm pretrain` output `OUT/model`, or a text "
                                                "BERT folder); 'none' or omitted: random initialisation of --preset")
    preset: str = option("bert-demo", choices=tuple(BERT_PRESETS),
                         help="transformer shape when starting from random weights")
    nlvr2_features: Path | None = option(None, help="feature store of the NLVR2 images (default: --features)")
    train_split: str | None = option(None, help="default: the first train* split of the task's data")
    eval_splits: list[str] | None = option(None, flags=("--eval-split",), help="held-out split to evaluate "
                                           "(repeatable; default: every split of the task's data not named "
                                           "train*; retrieval: test)")
    max_train: int | None = option(None, help="use at most this many training examples")
    max_eval: int | None = option(None, help="evaluate at most this many examples (retrieval: images)")
    eval_batch_size: int = option(128, help="batch at evaluation")
    eval_examples: int = option(500, help="examples per periodic evaluation (the final one uses every example)")
    num_answers: int = option(VQATaskConfig.num_answers, help="VQA answer set size, capped by the distinct "
                                                              "training answers (paper: 3129)")
    # From random or briefly pre-trained weights the model otherwise settles on the question-type prior and
    # never learns to find the named object among the regions (docs/RESULTS.md: the oracle runs).
    curriculum_epochs: int = option(0, help="vqa: epochs on the attribute questions (colour, shape, size, "
                                            "pattern) before the full set")
    # Oracle regions, the demo's recipe, two seeds (docs/RESULTS.md): 91.0 / 88.8 -> 91.5 / 92.2% of the ceiling.
    curriculum_yes_no: bool = option(False, help="vqa: the curriculum also takes the yes/no questions about named "
                                                 "objects (\"is the red star striped?\", \"is there a red star?\")")
    vqa_pool: str = option("cls", help="vqa: what the answer head reads: [CLS] (OSCAR), the mean of the question "
                                       "and tag tokens, that mean beside the final region states weighted by "
                                       "the question (region-attention), or that and soft counts of the regions "
                                       "the question names, fitted to the counting answers (region-count), or "
                                       "the mean beside two picks and their comparisons (pick-compare), or that "
                                       "and a count, the null slot's weights and the predicate's fit read from "
                                       "the first pick's region scores, the count fitted to the counting answers "
                                       "(pick-match), or that with the question split at its relation word between "
                                       "the two picks and the relation read from their boxes (pick-relate)",
                           choices=VQA_POOLS)
    nlvr2_pool: str = option("cls", help="nlvr2: what the classifier reads of each image: [CLS] (OSCAR) or the "
                                         "text mean beside the regions the statement picks (region-attention), "
                                         "or that and soft counts of the regions it names (region-count), or the "
                                         "mean beside two picks and their comparisons (pick-compare), or that and "
                                         "what the first pick's region scores say (pick-match), and the relation "
                                         "between the two picks' boxes (pick-relate)",
                             choices=NLVR2_POOLS)
    region_null: bool = option(False, help="vqa/nlvr2 region-attention, region-count, pick-compare/-match/-relate: the "
                                           "attention may pick a learned null slot instead of a region, when the "
                                           "image holds nothing the text names (fusion.heads.RegionAttention)")
    nlvr2_mirror: bool = option(False, help="nlvr2: train on each pair as seen in a mirror half of the time (images "
                                            "swapped and flipped, 'left' and 'right' swapped in the statement)")
    negatives: int = option(RetrievalTaskConfig.negatives_per_positive,
                            help="retrieval: mismatched pairs per matched pair")
    # Random negatives, as OSCAR: from random weights they train faster than hard ones.
    hard_pool: int = option(1, help="retrieval: candidates per negative, the most word-overlapping one is kept")
    beam_size: int = option(1, help="caption: beam size at evaluation")
    scst_steps: int = option(0, help="caption: CIDEr-D optimisation (SCST) steps after cross-entropy (0: none)")
    caption_mask_prob: float = option(CaptionTaskConfig.mask_prob, flags=("--mask-prob",),
                                      help="caption: share of caption tokens masked and predicted per step "
                                           "(paper: 0.15; more predictions per step train faster on a CPU budget)")
    caption_objective: str = option(CaptionTaskConfig.objective, choices=CAPTION_OBJECTIVES,
                                    help="caption: 'masked' (the paper) or 'every-token' (every token predicted "
                                         "from the clean caption before it, in one pass: the decoder's own "
                                         "situation; trains faster on a small budget)")
    caption_output_vocab: str = option(CaptionTaskConfig.output_vocab, choices=CAPTION_OUTPUT_VOCABS,
                                       help="caption: the word pieces the decoder may emit: 'all' of BERT's "
                                            "(the paper) or only those of the training captions ('train': a CPU "
                                            "trains faster, the 30,522-wide layer was half an every-token step)")
    progress: bool = option(True, help="progress bars at evaluation")
    train: TrainConfig | None = option(None, help=f"trainer (default: the task's, epochs {DEFAULT_EPOCHS}, "
                                                  f"lr {DEFAULT_LR}, batch 32)")

    def __post_init__(self):
        if self.train is None and self.task in DEFAULT_LR:
            self.train = task_train_config(self.task)

    def train_config(self, n_examples: int) -> TrainConfig:
        """The trainer for `n_examples`: max_steps wins over epochs (as many epochs as it takes)."""
        cfg = self.train
        if cfg.max_steps:
            epochs = math.ceil(cfg.max_steps * cfg.batch_size / max(1, n_examples))
            cfg = dataclasses.replace(cfg, epochs=max(cfg.epochs, epochs))
        return cfg


def check(setup: FinetuneSetup) -> None:
    """Refuses a setup that cannot run, with one line naming the flag."""
    if setup.task not in TASKS:
        raise MiniVLMError(f"unknown task {setup.task!r}; choose one of: {', '.join(TASKS)}")
    p = setup.pretrained
    if p is not None and not (Path(p) / "config.json").is_file():
        raise MiniVLMError(f"{p}: not a pre-trained model folder (no config.json); for `minivlm pretrain "
                           "--out OUT` the folder is OUT/model")
    if not 0.0 < setup.caption_mask_prob <= 1.0:
        raise MiniVLMError(f"--mask-prob must be in (0, 1] (got {setup.caption_mask_prob})")
    t = setup.train
    for flag, value in (("epochs", t.epochs), ("max-steps", t.max_steps), ("batch-size", t.batch_size),
                        ("eval-batch-size", setup.eval_batch_size), ("num-answers", setup.num_answers)):
        if value is not None and value < 1:
            raise MiniVLMError(f"--{flag} must be at least 1 (got {value})")
    if setup.curriculum_epochs < 0:
        raise MiniVLMError(f"--curriculum-epochs must be at least 0 (got {setup.curriculum_epochs})")


class Run:
    """Shared plumbing: world, stores, tokenizer, config, messages, output files."""

    def __init__(self, setup: FinetuneSetup):
        from minivlm.data.feature_store import FeatureStore
        from minivlm.data.world import World
        from minivlm.fusion.loading import vocab_of

        self.setup = setup
        self.rank = distributed_env()[0]
        self.world = World(setup.data)
        self.store = FeatureStore(setup.features)
        vocab = vocab_of(setup.pretrained) if setup.pretrained else None
        self.tokenizer: Tokenizer = get_tokenizer(str(vocab)) if vocab else get_tokenizer()
        self.out = Path(setup.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.train_split: str | None = None  # set by the driver, read by the task's hooks
        self.eval_splits: list[str] = []
        torch.manual_seed(setup.train.seed)  # before the task model is built: its random init is reproducible

    def say(self, msg: str) -> None:
        if self.rank == 0:
            tqdm.write(f"[finetune {self.setup.task}] {msg}")

    def bert_config(self, store) -> BertConfig:
        return task_bert_config(self.setup.pretrained, self.setup.preset, store.feature_dim, self.tokenizer.vocab_size)

    def init(self, model: torch.nn.Module) -> None:
        summary = init_from_pretrained(model, self.setup.pretrained)
        self.say(summary.splitlines()[0] if summary else "")
        if self.rank == 0:
            write_text(self.out / "init_report.txt", summary + "\n")

    def write_folder(self, cfg: BertConfig, **extra: Any) -> None:
        from minivlm.model import write_task_config

        if self.rank != 0:
            return
        with atomic_path(self.out / "vocab.txt") as tmp:
            shutil.copyfile(self.tokenizer.vocab_path, tmp)
        write_task_config(self.out, self.setup.task, cfg, pretrained=str(self.setup.pretrained or ""), **extra)

    def fit(self, model, dataset, collate, eval_fn: Callable | None, phase: str = "", epochs: int | None = None) -> dict:
        """Trains `model` on `dataset` with the setup's recipe. A `phase` (e.g. "curriculum") trains for
        `epochs` in its own sub-folder, so a rerun resumes or skips it like the main run."""
        cfg = self.setup.train_config(len(dataset))
        if phase:
            cfg = dataclasses.replace(cfg, epochs=epochs or cfg.epochs, max_steps=None, eval_every=None)
        out = self.out / phase if phase else self.out
        torch.manual_seed(self.setup.train.seed)
        trainer = Trainer(model, cfg, out, desc=f"finetune {self.setup.task}{f' {phase}' if phase else ''}")
        n = sum(p.numel() for p in model.parameters())
        self.say(f"{len(dataset)} training examples, {n / 1e6:.2f} M parameters, lr {cfg.lr}, batch {cfg.batch_size}, "
                 f"{cfg.epochs} epoch(s){f', at most {cfg.max_steps} steps' if cfg.max_steps else ''}")
        last = trainer.fit(dataset, collate, eval_fn)
        if "loss" not in last:  # a rerun of a finished run trains no step: report the logged end of training
            last = next((e for e in reversed(read_log(out / "log.jsonl")) if "loss" in e), last)
        return {k: v for k, v in last.items() if k != "eval"}

    def finish(self, metrics: dict) -> dict:
        if self.rank == 0:
            write_json(self.out / "metrics.json", metrics, indent=1)
        return metrics


def finetune(setup: FinetuneSetup) -> dict:
    """Fine-tunes `setup.task` (one `Task` of `minivlm.tasks.registry.TASKS`): takes the World's training split
    of the task's data (unless named), builds and initialises the model, writes the task folder, trains, then
    scores every held-out split beside the task's baselines. Returns the metrics written to metrics.json."""
    from minivlm.model import head_settings
    from minivlm.tasks.registry import TASKS as REGISTRY

    check(setup)
    run = Run(setup)
    task = REGISTRY[setup.task](run)
    run.train_split = run.world.train_split(task.kind, setup.train_split)
    train = task.train_examples(run.train_split)
    run.eval_splits = [s for s in (setup.eval_splits or task.eval_splits()) if s != run.train_split]

    model = task.build_model(run.bert_config(task.store))
    run.write_folder(model.cfg, train_split=run.train_split, **head_settings(setup.task, model), **task.folder_extra())
    periodic = run.eval_splits[0] if run.eval_splits else None
    eval_fn = (lambda m, step: task.quick_eval(model, periodic)) if periodic and setup.train.eval_every else None
    metrics: dict[str, Any] = {"task": setup.task, "train_split": run.train_split, "n_train": len(train),
                               **task.fit(model, train, eval_fn), "eval": {}}
    if run.rank != 0:
        return metrics
    for split in run.eval_splits:
        examples = task.examples(split, setup.max_eval)
        if not examples:
            continue
        results = task.predict(model, examples)
        write_json(run.out / f"results_{split}.json", task.results_file(examples, results))
        entry = metrics["eval"][split] = task.score(split, examples, results)
        run.say(f"{split}: {_numbers(entry['metrics'])} vs baselines {_numbers(entry['baselines'])}")
    return run.finish(metrics)


def _numbers(values: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in values.items() if isinstance(v, (int, float))) or "none"


# ---------------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setup_arguments(parser, FinetuneSetup)


def run(args: argparse.Namespace) -> int:
    finetune(setup_from_args(FinetuneSetup, args))
    return 0
