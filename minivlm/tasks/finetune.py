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
    metrics.json         per split: the task metric beside its chance / prior baseline
    log.jsonl, checkpoint/, train_config.json, init_report.txt

Captioning is trained by `minivlm.tasks.caption.train_caption`; this module passes it the same inputs.
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

from minivlm.config import BERT_PRESETS, CAPTION_OBJECTIVES, BertConfig, CaptionTaskConfig, RetrievalTaskConfig, TrainConfig, VQATaskConfig
from minivlm.errors import MiniVLMError
from minivlm.io import atomic_path, write_json, write_text
from minivlm.tasks.data import TASKS, init_from_pretrained, pick_split, task_bert_config
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
    train_split: str | None = option(None, help="default: the task's train* split")
    eval_splits: list[str] | None = option(None, flags=("--eval-split",), help="held-out split to evaluate "
                                           "(repeatable; default: every other split of the task)")
    max_train: int | None = option(None, help="use at most this many training examples")
    max_eval: int | None = option(None, help="evaluate at most this many examples (retrieval: images)")
    eval_batch_size: int = option(128, help="batch at evaluation")
    eval_examples: int = option(500, help="examples per periodic evaluation (the final one uses every example)")
    num_answers: int = option(VQATaskConfig.num_answers, help="VQA answer set size, capped by the distinct "
                                                              "training answers (paper: 3129)")
    # From random or briefly pre-trained weights the model otherwise settles on the question-type prior and
    # never learns to find the named object among the regions (README: Grounding).
    curriculum_epochs: int = option(0, help="vqa: epochs on the attribute questions (colour, shape, size, "
                                            "pattern) before the full set")
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
    if setup.task not in FINETUNE:
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


def _cap(items: list, n: int | None) -> list:
    return items if n is None else items[:n]


# ---------------------------------------------------------------------------------------------- VQA

# VQA v2 question types whose answer is one attribute of one named object: the curriculum's questions.
ATTRIBUTE_QUESTION_TYPES = ("what color", "what shape", "what size", "what pattern")


def finetune_vqa(setup: FinetuneSetup) -> dict:
    from minivlm.eval.vqa_eval import vqa_accuracy
    from minivlm.model import read_lines, write_lines
    from minivlm.tasks.vqa import (VQACollator, VQADataset, VQAModel, baseline_results, build_answer_vocab,
                                   make_examples, predict_vqa)

    run = Run(setup)
    w = run.world
    splits = w.splits("vqa")
    train_split = pick_split(splits, setup.train_split, ["train"], "VQA", w.vqa_questions_path("*").parent)
    if train_split is None:
        raise MiniVLMError(f"{w.root / 'vqa'}: no VQA train split (v2_OpenEnded_mscoco_train*_questions.json)")
    train_q = w.vqa(train_split)
    if not any(q.answers for q in train_q):
        raise MiniVLMError(f"{w.vqa_annotations_path(train_split)}: the training split needs its annotations")
    # The answer set is fixed by the first run: a resumed run must build the very same head.
    answers_path = run.out / "answers.txt"
    answers = read_lines(answers_path) if answers_path.is_file() else build_answer_vocab(train_q, setup.num_answers)
    if run.rank == 0:
        write_lines(answers_path, answers)
    train, missing = make_examples(train_q, run.store, answers, drop_unanswerable=True)
    train = _cap(train, setup.max_train)
    if not train:
        raise MiniVLMError(f"{setup.features}: none of the {train_split} VQA images has features in this store")
    run.say(f"{train_split}: {len(train)} questions, {len(answers)} answers"
            + (f" ({missing} skipped: image not in the store)" if missing else ""))
    eval_splits = [s for s in (setup.eval_splits or [s for s in splits if s != train_split]) if s != train_split]

    cfg = run.bert_config(run.store)
    model = VQAModel(cfg, len(answers))
    run.init(model)
    model.init_answer_bias([e.targets for e in train])
    run.write_folder(cfg, num_answers=len(answers), train_split=train_split)

    def score(split: str, limit: int | None) -> tuple[list[dict], dict | None, list]:
        qs = w.vqa(split)
        examples, _ = make_examples(qs, run.store, answers)
        examples = _cap(examples, limit)
        results = predict_vqa(model, run.tokenizer, examples, run.store, answers, setup.eval_batch_size,
                              progress=setup.progress)
        kept = {e.question_id for e in examples}
        scored = [q for q in qs if q.question_id in kept and q.answers]
        if not scored:
            return results, None, scored
        scored_ids = {q.question_id for q in scored}
        acc = vqa_accuracy({r["question_id"]: r["answer"] for r in results if r["question_id"] in scored_ids}, scored)
        return results, acc, scored

    periodic = eval_splits[0] if eval_splits else None

    def eval_fn(m, step):
        _, acc, _ = score(periodic, setup.eval_examples)
        return {"vqa_acc": acc["overall"]} if acc else {}

    metrics: dict[str, Any] = {}
    if setup.curriculum_epochs:
        qtype = {q.question_id: q.question_type for q in train_q}
        easy = [e for e in train if qtype[e.question_id].startswith(ATTRIBUTE_QUESTION_TYPES)]
        if not easy:
            raise MiniVLMError(f"--curriculum-epochs: no attribute question ({', '.join(ATTRIBUTE_QUESTION_TYPES)}"
                               f"...) in {train_split}")
        run.say(f"curriculum: {setup.curriculum_epochs} epoch(s) on the {len(easy)} attribute questions first")
        metrics["curriculum"] = {"n_train": len(easy), "epochs": setup.curriculum_epochs,
                                 "train": run.fit(model, VQADataset(easy, run.store),
                                                  VQACollator(run.tokenizer, cfg, len(answers)), None,
                                                  phase="curriculum", epochs=setup.curriculum_epochs)}
    train_stats = run.fit(model, VQADataset(train, run.store), VQACollator(run.tokenizer, cfg, len(answers)),
                          eval_fn if periodic and setup.train.eval_every else None)
    metrics = {"task": "vqa", "train_split": train_split, "n_train": len(train), "num_answers": len(answers),
               **metrics, "train": train_stats, "eval": {}}
    if run.rank == 0:
        for split in eval_splits:
            results, acc, scored = score(split, setup.max_eval)
            write_json(run.out / f"results_{split}.json", [{"question_id": r["question_id"], "answer": r["answer"]}
                                                           for r in results])
            entry: dict[str, Any] = {"n_questions": len(results)}
            if acc is not None:
                entry.update(accuracy=acc["overall"], per_question_type=acc["perQuestionType"],
                             per_answer_type=acc["perAnswerType"])
                for name, base in baseline_results(train_q, scored).items():
                    b = vqa_accuracy(base, scored)
                    entry[f"baseline_{name}"] = {"accuracy": b["overall"], "per_question_type": b["perQuestionType"]}
                run.say(f"{split}: VQA accuracy {acc['overall']:.2f} vs most-frequent-answer "
                        f"{entry['baseline_most_frequent']['accuracy']:.2f}, per-question-type prior "
                        f"{entry['baseline_per_question_type']['accuracy']:.2f} ({len(scored)} questions)")
            else:
                run.say(f"{split}: {len(results)} answers written (no annotations to score against)")
            metrics["eval"][split] = entry
    return run.finish(metrics)


# ---------------------------------------------------------------------------------------------- NLVR2


def finetune_nlvr2(setup: FinetuneSetup) -> dict:
    from minivlm.data.feature_store import FeatureStore
    from minivlm.eval.nlvr2 import nlvr2_accuracy
    from minivlm.tasks.nlvr2 import NLVR2Collator, NLVR2Dataset, NLVR2Model, make_pairs, predict_nlvr2

    run = Run(setup)
    store = FeatureStore(setup.nlvr2_features) if setup.nlvr2_features else run.store
    w = run.world
    splits = w.splits("nlvr2")
    train_split = pick_split(splits, setup.train_split, ["train"], "NLVR2", w.nlvr2_path("*").parent)
    if train_split is None:
        raise MiniVLMError(f"{w.root / 'nlvr2'}: no NLVR2 train split (train.json)")
    train, missing = make_pairs(w.nlvr2(train_split), store)
    train = _cap(train, setup.max_train)
    if not train:
        raise MiniVLMError(f"{store.root}: none of the NLVR2 {train_split} images has features in this store "
                           "(pass --nlvr2-features, the store `minivlm extract` wrote for nlvr2/images)")
    run.say(f"{train_split}: {len(train)} statement/pair examples"
            + (f" ({missing} skipped: an image not in the store)" if missing else ""))
    eval_splits = [s for s in (setup.eval_splits or [s for s in splits if s != train_split]) if s != train_split]

    cfg = run.bert_config(store)
    model = NLVR2Model(cfg)
    run.init(model)
    run.write_folder(cfg, train_split=train_split)

    def score(split: str, limit: int | None) -> tuple[list[dict], dict, list]:
        examples = w.nlvr2(split)
        pairs, _ = make_pairs(examples, store)
        pairs = _cap(pairs, limit)
        results = predict_nlvr2(model, run.tokenizer, pairs, store, setup.eval_batch_size, progress=setup.progress)
        kept = {p.identifier for p in pairs}
        scored = [e for e in examples if e.identifier in kept]
        return results, nlvr2_accuracy({r["identifier"]: r["prediction"] for r in results}, scored), scored

    periodic = eval_splits[0] if eval_splits else None
    train_stats = run.fit(model, NLVR2Dataset(train, store), NLVR2Collator(run.tokenizer, cfg),
                          (lambda m, step: {"nlvr2_acc": score(periodic, setup.eval_examples)[1]["accuracy"]})
                          if periodic and setup.train.eval_every else None)
    metrics: dict[str, Any] = {"task": "nlvr2", "train_split": train_split, "n_train": len(train),
                               "train": train_stats, "eval": {}}
    if run.rank == 0:
        for split in eval_splits:
            results, acc, scored = score(split, setup.max_eval)
            write_json(run.out / f"results_{split}.json", results)
            majority = sum(e.label for e in scored) / len(scored)
            entry = {**acc, "chance": 50.0, "baseline_majority": 100.0 * max(majority, 1 - majority)}
            metrics["eval"][split] = entry
            run.say(f"{split}: NLVR2 accuracy {acc['accuracy']:.2f} vs chance 50.00, majority class "
                    f"{entry['baseline_majority']:.2f}; consistency {acc['consistency']:.2f} ({len(scored)} examples)")
    return run.finish(metrics)


# ---------------------------------------------------------------------------------------------- retrieval


def retrieval_captions(world, split: str) -> dict[int, list[str]]:
    """Image id -> captions of a retrieval split: a Karpathy split name (train includes restval) when
    dataset_coco.json exists, else a COCO captions file's split."""
    if world.karpathy_path().is_file() and split in {"train", "val", "test"}:
        return {k.image_id: k.sentences for k in world.karpathy() if k.split == split}
    return dict(world.captions(split).captions)


def retrieval_splits(world) -> list[str]:
    if world.karpathy_path().is_file():
        return sorted({k.split for k in world.karpathy()})
    return [s for s in world.splits("coco") if world.captions_path(s).is_file()]


def finetune_retrieval(setup: FinetuneSetup) -> dict:
    from minivlm.eval.retrieval import retrieval_metrics
    from minivlm.tasks.retrieval import (RetrievalCollator, RetrievalDataset, RetrievalModel, chance_recall,
                                         retrieval_set, score_all_pairs)
    from minivlm.tasks.data import find_key

    run = Run(setup)
    w = run.world
    splits = retrieval_splits(w)
    where = w.karpathy_path() if w.karpathy_path().is_file() else w.root / "annotations"
    train_split = pick_split(splits, setup.train_split, ["train"], "caption", where)
    if train_split is None:
        raise MiniVLMError(f"{where}: no train split with captions")
    pairs, missing = [], 0
    for iid, caps in retrieval_captions(w, train_split).items():
        key = find_key(run.store, iid)
        if key is None:
            missing += 1
            continue
        pairs += [(key, c) for c in caps if c.strip()]
    pairs = _cap(pairs, setup.max_train)
    if not pairs:
        raise MiniVLMError(f"{setup.features}: none of the {train_split} images has features in this store")
    run.say(f"{train_split}: {len(pairs)} captions of {len({k for k, _ in pairs})} images, {setup.negatives} "
            f"negative(s) each" + (f" ({missing} images skipped: not in the store)" if missing else ""))
    # Karpathy "test" is the paper's test set; fall back to val when there is no test split.
    eval_splits = setup.eval_splits or ([s for s in ("test",) if s in splits] or
                                        [s for s in splits if s.startswith(("test", "val"))][:1])
    eval_splits = [s for s in eval_splits if s != train_split]

    cfg = run.bert_config(run.store)
    model = RetrievalModel(cfg)
    run.init(model)
    run.write_folder(cfg, train_split=train_split, negatives_per_positive=setup.negatives)
    regions_of = lambda keys: [_top(run.store[k], cfg.max_regions) for k in keys]  # noqa: E731

    def score(split: str, limit: int | None):
        rset, _ = retrieval_set(retrieval_captions(w, split), run.store, limit)
        if len(rset.image_keys) < 2:
            raise MiniVLMError(f"retrieval split {split!r}: fewer than 2 images with features and captions")
        scores = score_all_pairs(model, run.tokenizer, regions_of(rset.image_keys), rset.texts,
                                 setup.eval_batch_size, progress=setup.progress)
        return rset, scores, retrieval_metrics(scores, rset.text_to_image)

    periodic = eval_splits[0] if eval_splits else None
    eval_images = max(2, setup.eval_examples // 10)  # every pair is scored: keep periodic checks small

    def eval_fn(m, step):
        _, _, r = score(periodic, eval_images)
        return {"TR@1": r["full"]["TR@1"], "IR@1": r["full"]["IR@1"]}

    dataset = RetrievalDataset(pairs, run.store, setup.negatives, setup.hard_pool)
    train_stats = run.fit(model, dataset, RetrievalCollator(run.tokenizer, cfg),
                          eval_fn if periodic and setup.train.eval_every else None)
    metrics: dict[str, Any] = {"task": "retrieval", "train_split": train_split, "n_train": len(pairs),
                               "train": train_stats, "eval": {}}
    if run.rank == 0:
        for split in eval_splits:
            rset, scores, r = score(split, setup.max_eval)
            write_json(run.out / f"results_{split}.json", {
                "scores": [[round(float(v), 4) for v in row] for row in scores], "text_to_image": rset.text_to_image,
                "image_ids": rset.image_keys, "texts": rset.texts})
            r["chance"] = chance_recall(rset.text_to_image, len(rset.image_keys))
            if "folds" in r:
                r["chance_folds"] = chance_recall([t % r["fold_size"] for t in rset.text_to_image
                                                   if t < r["fold_size"]], r["fold_size"])
            metrics["eval"][split] = r
            f = r["full"]
            run.say(f"{split} ({r['n_images']} images, {r['n_texts']} captions): text retrieval R@1/5/10 "
                    f"{f['TR@1']:.1f}/{f['TR@5']:.1f}/{f['TR@10']:.1f}, image retrieval "
                    f"{f['IR@1']:.1f}/{f['IR@5']:.1f}/{f['IR@10']:.1f}; chance R@1 TR {r['chance']['TR@1']:.1f}, "
                    f"IR {r['chance']['IR@1']:.1f}"
                    + (f"; {r['n_folds']} folds of {r['fold_size']}: TR@1 {r['folds']['TR@1']:.1f}, "
                       f"IR@1 {r['folds']['IR@1']:.1f}" if "folds" in r else ""))
    return run.finish(metrics)


def _top(regions, k: int):
    return regions.top(k) if len(regions) > k else regions


# ---------------------------------------------------------------------------------------------- caption


def caption_splits(world) -> list[str]:
    splits = [s for s in world.splits("coco") if world.captions_path(s).is_file()]
    if world.karpathy_path().is_file():
        splits += [s for s in ("train", "val", "test") if s not in splits]
    return splits


def finetune_caption(setup: FinetuneSetup) -> dict:
    """Cross-entropy (then optional SCST) training by `minivlm.tasks.caption.train_caption`, which resumes
    each stage; then captions of the held-out splits scored with the COCO metrics."""
    from collections import Counter

    from minivlm.eval.caption_metrics import JavaError, score_captions
    from minivlm.io import save_weights
    from minivlm.tasks.caption import caption_references, predict_captions, train_caption
    from minivlm.tasks.data import find_key

    run = Run(setup)
    w = run.world
    splits = caption_splits(w)
    train_split = pick_split(splits, setup.train_split, ["train"], "caption", w.root / "annotations")
    if train_split is None:
        raise MiniVLMError(f"{w.root / 'annotations'}: no captions_train*.json and no Karpathy split")
    train_refs = caption_references(w, train_split)
    in_store = [caps for k, caps in train_refs.items() if find_key(run.store, k) is not None]
    n_images, n_train = len(in_store), sum(len(caps) for caps in in_store)
    eval_splits = [s for s in (setup.eval_splits or [s for s in splits if s.startswith(("val", "test"))])
                   if s != train_split]
    cfg = run.bert_config(run.store)
    train_cfg = setup.train_config(n_train)
    scst_cfg = None
    if setup.scst_steps:
        scst_cfg = dataclasses.replace(train_cfg, max_steps=setup.scst_steps, lr=train_cfg.lr / 4,
                                       epochs=max(1, math.ceil(setup.scst_steps * train_cfg.batch_size / max(1, n_images))))  # one row per image
    run.say(f"{train_split}: {n_train} captions; evaluation on {', '.join(eval_splits) or 'nothing'}")
    model = train_caption(setup.pretrained, w, run.store, run.out, cfg, train_cfg, scst_cfg, tokenizer=run.tokenizer,
                          task_cfg=CaptionTaskConfig(objective=setup.caption_objective, mask_prob=setup.caption_mask_prob),
                          train_split=train_split, val_split=eval_splits[0] if eval_splits else None,
                          val_images=max(0, setup.eval_examples // 5) if setup.train.eval_every else 0)
    metrics: dict[str, Any] = {"task": "caption", "train_split": train_split, "n_train": n_train, "eval": {}}
    if run.rank != 0:
        return metrics
    save_weights(model.state_dict(), run.out / "model.safetensors")
    run.write_folder(model.cfg, train_split=train_split, scst=scst_cfg is not None)
    # The "prior" baseline: the most frequent training caption, given to every image.
    common = Counter(c.strip().lower() for caps in train_refs.values() for c in caps).most_common(1)[0][0]
    for split in eval_splits:
        refs = {k: v for k, v in caption_references(w, split).items() if find_key(run.store, k) is not None}
        keys = _cap(sorted(refs), setup.max_eval)
        if not keys:
            continue
        rows = predict_captions(model, run.tokenizer, keys, run.store, batch_size=setup.eval_batch_size,
                                beam_size=setup.beam_size, progress=setup.progress)
        write_json(run.out / f"results_{split}.json", rows)
        refs = {k: refs[k] for k in keys}
        entry: dict[str, Any] = {}
        for name, res in (("model", rows), ("baseline_most_common_caption", {k: common for k in keys})):
            meteor = name == "model"  # METEOR (java) for the model's captions only: the baseline compares on CIDEr
            try:
                entry[name] = score_captions(res, refs, meteor=meteor, spice=False)
            except JavaError:  # no java for the PTB tokenizer: score on a plain lower-cased split instead
                entry[name] = {**score_captions(res, refs, tokenizer="simple", meteor=False, spice=False),
                               "tokenizer": "simple"}
        metrics["eval"][split] = entry
        run.say(f"{split}: CIDEr {entry['model']['CIDEr']:.3f} BLEU-4 {entry['model']['Bleu_4']:.3f} vs the most "
                f"common training caption CIDEr {entry['baseline_most_common_caption']['CIDEr']:.3f} "
                f"({len(keys)} images); e.g. {rows[0]['caption']!r}")
    return run.finish(metrics)


FINETUNE: dict[str, Callable[[FinetuneSetup], dict]] = {
    "caption": finetune_caption, "vqa": finetune_vqa, "nlvr2": finetune_nlvr2, "retrieval": finetune_retrieval,
}


def finetune(setup: FinetuneSetup) -> dict:
    """Fine-tunes `setup.task`; returns the metrics written to metrics.json."""
    check(setup)
    return FINETUNE[setup.task](setup)


# ---------------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setup_arguments(parser, FinetuneSetup)


def run(args: argparse.Namespace) -> int:
    finetune(setup_from_args(FinetuneSetup, args))
    return 0
