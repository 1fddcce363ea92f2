"""Vision-language pre-training (OSCAR's recipe, as MiniVLM uses it): masked language modelling over text
AND tag tokens, plus image-text matching where half of the pairs have their caption or their tags
replaced by another image's.

    minivlm pretrain --data WORLD --features STORE --out runs/pretrain --preset bert-demo [--tags gt]

Pieces, each usable from Python:
  * `mask_tokens`     15% of the word pieces of text and tags; of those 80% [MASK], 10% a random word
                      piece, 10% unchanged; [CLS]/[SEP]/[PAD] never.
  * `PretrainDataset` (regions, text, tags) per example, polluted with probability 0.5 (ITM label 1); with
                      `itm_swap_frac` some polluted captions are the image's own with one word swapped.
  * `PretrainCollator` OSCAR inputs (`build_batch`) + masks + labels -> `FusionBatch`.
  * `PretrainModel`   MultimodalBert + MLM head (untied decoder) + ITM head; forward(batch) -> losses and
                      accuracies, as the Trainer wants.
  * `evaluate`        held-out MLM and ITM accuracy on fixed (seeded) masks and pollutions; `swap_batches`
                      the held-out captions beside their one-word swaps (`itm_swap_acc`: does the model
                      check each word against the regions?).
  * `pretrain(PretrainSetup(...))` the whole stage (the command's flags are generated from PretrainSetup).
The result is a "pretrain" checkpoint folder (`minivlm.checkpoint`: config.json + model.safetensors +
vocab.txt) that fine-tuning starts from.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from minivlm import checkpoint
from minivlm.config import BERT_PRESETS, BertConfig, PretrainTaskConfig, TrainConfig, get_bert, to_dict
from minivlm.errors import MiniVLMError
from minivlm.fusion.heads import ITMHead, MLMHead
from minivlm.fusion.inputs import FusionBatch, build_batch
from minivlm.fusion.loading import load_text_weights, vocab_of
from minivlm.fusion.transformer import MultimodalBert
from minivlm.io import write_json, write_text
from minivlm.regions import Regions
from minivlm.tasks.corpus import TAG_SOURCES, PretrainExample, RegionSource, build_corpus, pseudo_caption_corpus
from minivlm.tasks.hard_negatives import WordFamilies
from minivlm.text.tokenizer import Tokenizer, get_tokenizer
from minivlm.setup_args import add_setup_arguments, option, setup_from_args
from minivlm.train.trainer import Trainer, distributed_env

IGNORE = -100


# ---------------------------------------------------------------------------------------------- masking


@lru_cache(maxsize=8)
def first_word_piece(tokenizer: Tokenizer) -> int:
    """Lowest id of a real word piece: BERT's vocabulary starts with [PAD], [unusedN], [CLS], ... which a
    random replacement should never produce."""
    for i in range(tokenizer.vocab_size):
        if not tokenizer.id_to_token(i).startswith("["):
            return i
    raise MiniVLMError(f"{tokenizer.vocab_path}: no ordinary word piece in the vocabulary")


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, mask_id: int, random_range: tuple[int, int],
                task: PretrainTaskConfig, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking over `maskable` positions: returns (masked input ids, labels with -100 elsewhere).
    At least one token is chosen when any is maskable, so the MLM loss is never empty."""
    chosen = (torch.rand(input_ids.shape, generator=generator) < task.mask_prob) & maskable
    if not chosen.any() and maskable.any():
        candidates = maskable.flatten().nonzero().flatten()
        pick = candidates[torch.randint(len(candidates), (1,), generator=generator)]
        chosen.view(-1)[pick] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    roll = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (roll < task.mask_token_frac)
    to_random = chosen & (roll >= task.mask_token_frac) & (roll < task.mask_token_frac + task.random_token_frac)
    random_ids = torch.randint(random_range[0], random_range[1], input_ids.shape, generator=generator)
    ids = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    ids = torch.where(to_random, random_ids, ids)
    return ids, labels


# ---------------------------------------------------------------------------------------------- data


@dataclass
class PretrainItem:
    regions: Regions
    text: str
    tags: list[str]
    polluted: int  # ITM label: 1 when the text or the tags come from another image, IGNORE: no ITM
    image: tuple[int, int | str]  # (store, key) of the regions
    text_image: tuple[int, int | str]  # the image the text describes
    tags_image: tuple[int, int | str]  # the image the tags belong to
    negative: str = ""  # how it was polluted: "tags", "caption" (another image's) or "swap" (one word swapped)


class PretrainDataset(Dataset):
    """Examples over one or more feature stores; item i is example i, polluted at random for ITM."""

    def __init__(self, examples: Sequence[PretrainExample], stores: Sequence[RegionSource],
                 task: PretrainTaskConfig | None = None, max_tries: int = 20, families: WordFamilies | None = None):
        self.examples, self.stores = list(examples), list(stores)
        self.task = task or PretrainTaskConfig()
        self.families = families
        if self.task.itm_swap_frac > 0 and families is None:
            raise MiniVLMError("itm_swap_frac > 0 needs the word families to swap (PretrainDataset(families=...))")
        self.max_tries = max_tries
        if len({(e.source, e.image_key) for e in self.examples}) < 2:
            raise MiniVLMError("pre-training needs examples from at least two images (ITM pairs an image "
                               "with another image's text or tags)")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PretrainItem:
        return self.item(i, None)

    def _other(self, me: tuple, generator: torch.Generator | None, differs) -> PretrainExample | None:
        """A random example from another image for which `differs(example)` holds."""
        for _ in range(self.max_tries):
            e = self.examples[int(torch.randint(len(self.examples), (1,), generator=generator))]
            if (e.source, e.image_key) != me and differs(e):
                return e
        return None

    def item(self, i: int, generator: torch.Generator | None = None) -> PretrainItem:
        ex = self.examples[i]
        me = (ex.source, ex.image_key)
        text, tags, text_image, tags_image, polluted, negative = ex.text, ex.tags, me, me, 0, ""
        if ex.kind == "vqa" and not self.task.itm_on_questions:
            polluted = IGNORE
        elif float(torch.rand((), generator=generator)) < self.task.itm_pollute_prob:
            other = None
            if ex.tags and float(torch.rand((), generator=generator)) >= self.task.pollute_caption_frac:
                # the other tags must name something this image lacks, or the "polluted" pair is true
                other = self._other(me, generator, lambda e: bool(set(e.tags) - set(ex.tags)))
                if other is not None:
                    tags, tags_image, polluted, negative = other.tags, (other.source, other.image_key), 1, "tags"
            if other is None and self.task.itm_swap_frac > 0 and \
                    float(torch.rand((), generator=generator)) < self.task.itm_swap_frac:
                swapped = self.families.swap(ex.text, ex.tags, generator)
                if swapped is not None:
                    text, polluted, negative = swapped, 1, "swap"
            if other is None and not polluted:
                other = self._other(me, generator, lambda e: e.text != ex.text)
                if other is not None:
                    text, text_image, polluted, negative = other.text, (other.source, other.image_key), 1, "caption"
        return PretrainItem(self.stores[ex.source][ex.image_key], text, list(tags), polluted, me, text_image,
                            tags_image, negative)


class PretrainCollator:
    """Items -> one FusionBatch with MLM labels (masked ids in `input_ids`) and ITM labels."""

    def __init__(self, tokenizer: Tokenizer, cfg: BertConfig, task: PretrainTaskConfig | None = None):
        self.tokenizer, self.cfg, self.task = tokenizer, cfg, task or PretrainTaskConfig()
        self.random_range = (first_word_piece(tokenizer), tokenizer.vocab_size)

    def __call__(self, items: Sequence[PretrainItem], generator: torch.Generator | None = None,
                 mask: bool = True) -> FusionBatch:
        batch = build_batch(self.tokenizer, [it.text for it in items], [it.tags for it in items],
                            [it.regions for it in items], self.cfg)
        if mask:
            ids, labels = mask_tokens(batch.input_ids, batch.maskable, self.tokenizer.mask_id, self.random_range,
                                      self.task, generator)
        else:
            ids, labels = batch.input_ids, torch.full_like(batch.input_ids, IGNORE)
        return dataclasses.replace(batch, input_ids=ids, mlm_labels=labels,
                                   itm_labels=torch.tensor([it.polluted for it in items], dtype=torch.long))


# ---------------------------------------------------------------------------------------------- model


class PretrainModel(nn.Module):
    def __init__(self, cfg: BertConfig, itm_weight: float = 1.0):
        super().__init__()
        self.cfg, self.itm_weight = cfg, itm_weight
        self.bert = MultimodalBert(cfg)
        self.mlm = MLMHead(cfg)
        self.itm = ITMHead(cfg)

    def scores(self, batch: FusionBatch) -> dict[str, torch.Tensor]:
        """Summed losses and correct counts with their denominators (for exact held-out averages)."""
        hidden = self.bert(**batch.model_inputs()).hidden_states
        text = hidden[:, : batch.input_ids.shape[1]]
        chosen = batch.mlm_labels != IGNORE
        itm_logits = self.itm(hidden)
        judged = batch.itm_labels != IGNORE
        mlm = {"mlm_loss_sum": hidden.new_zeros(()), "mlm_correct": chosen.sum(), "mlm_count": chosen.sum()}
        if chosen.any():  # batches scored for ITM alone mask nothing
            # fp32 before the arg-max too: over the vocabulary a bf16 arg-max is ~4x slower on the CPU
            logits, labels = self.mlm(text[chosen]).float(), batch.mlm_labels[chosen]
            mlm = {"mlm_loss_sum": F.cross_entropy(logits, labels, reduction="sum"),
                   "mlm_correct": (logits.argmax(-1) == labels).sum(), "mlm_count": chosen.sum()}
        return {
            **mlm,
            "itm_loss_sum": F.cross_entropy(itm_logits.float(), batch.itm_labels, reduction="sum",
                                            ignore_index=IGNORE),
            "itm_correct": (itm_logits.argmax(-1) == batch.itm_labels)[judged].sum(),
            "itm_count": judged.sum(),
        }

    def forward(self, batch: FusionBatch) -> dict[str, torch.Tensor]:
        s = self.scores(batch)
        n_mlm, n_itm = s["mlm_count"].clamp(min=1), s["itm_count"].clamp(min=1)
        mlm_loss, itm_loss = s["mlm_loss_sum"] / n_mlm, s["itm_loss_sum"] / n_itm
        return {"loss": mlm_loss + self.itm_weight * itm_loss, "mlm_loss": mlm_loss.detach(), "itm_loss": itm_loss.detach(),
                "mlm_acc": s["mlm_correct"] / n_mlm, "itm_acc": s["itm_correct"] / n_itm}


def fixed_batches(dataset: PretrainDataset, collator: PretrainCollator, batch_size: int, max_examples: int | None,
                  seed: int = 1234) -> list[FusionBatch]:
    """Held-out batches with seeded pollution and masks: every evaluation scores the same inputs."""
    g = torch.Generator().manual_seed(seed)
    n = len(dataset) if max_examples is None else min(len(dataset), max_examples)
    order = torch.randperm(len(dataset), generator=g)[:n].tolist()
    items = [dataset.item(i, g) for i in order]
    return [collator(items[i:i + batch_size], g) for i in range(0, n, batch_size)]


def swap_batches(dataset: PretrainDataset, collator: PretrainCollator, batch_size: int, max_captions: int,
                 seed: int = 4321) -> list[FusionBatch]:
    """Held-out captions each beside its one-word swap (ITM 0 and 1), the tags true and nothing masked: ITM
    accuracy on them says whether the model checks a caption's words against the regions (chance 50%)."""
    g = torch.Generator().manual_seed(seed)
    items: list[PretrainItem] = []
    for i in torch.randperm(len(dataset), generator=g).tolist():
        ex = dataset.examples[i]
        swapped = dataset.families.swap(ex.text, ex.tags, g) if ex.kind != "vqa" else None
        if swapped is None:
            continue
        me, regions = (ex.source, ex.image_key), dataset.stores[ex.source][ex.image_key]
        items += [PretrainItem(regions, ex.text, list(ex.tags), 0, me, me, me),
                  PretrainItem(regions, swapped, list(ex.tags), 1, me, me, me, "swap")]
        if len(items) >= 2 * max_captions:
            break
    return [collator(items[i:i + batch_size], g, mask=False) for i in range(0, len(items), batch_size)]


def word_families(world, split: str, store: RegionSource) -> WordFamilies | None:
    """The words a caption's swap may exchange: the tags' class names (the store's, else the split's
    instances'), the attribute groups of the split's instances (else the store's attributes as one family)."""
    classes, attributes = list(getattr(store, "class_names", []) or []), list(getattr(store, "attribute_names", []) or [])
    groups: dict[str, list[str]] = {}
    if world.instances_path(split).is_file():
        inst = world.instances(split)
        classes = classes or inst.class_names()
        if inst.attributes and all(a.group for a in inst.attributes):
            for a in inst.attributes:
                groups.setdefault(a.group, []).append(a.name)
        attributes = attributes or inst.attribute_names()
    if not classes:
        return None
    return WordFamilies.build(classes, groups or None, attributes)


@torch.no_grad()
def evaluate(model: PretrainModel, batches: Sequence[FusionBatch]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total: dict[str, float] = {}
    for batch in batches:
        for k, v in model.scores(batch.to(device)).items():
            total[k] = total.get(k, 0.0) + float(v)
    model.train(was_training)
    m, i = max(total.get("mlm_count", 0.0), 1.0), max(total.get("itm_count", 0.0), 1.0)
    return {"mlm_acc": total["mlm_correct"] / m, "itm_acc": total["itm_correct"] / i,
            "mlm_loss": total["mlm_loss_sum"] / m, "itm_loss": total["itm_loss_sum"] / i,
            "mlm_tokens": int(total["mlm_count"]), "itm_pairs": int(total["itm_count"])}


# ---------------------------------------------------------------------------------------------- command


@dataclass
class PretrainSetup:
    """Everything `pretrain` needs; the `minivlm pretrain` flags are generated from it."""

    RECIPES: ClassVar[str] = "pretrain"  # configs/pretrain.toml

    data: Path = option(help="dataset root (COCO-style annotations/, vqa/)")
    out: Path = option(help="output folder (log.jsonl, checkpoint/, model/)")
    features: Path | None = option(None, help="feature store of the dataset's images (`minivlm extract`)")
    detector: Path | None = option(None, help="a detector folder (`minivlm train-detector`): extract regions on the "
                                              "fly from the image files instead of reading a feature store")
    val_features: Path | None = option(None, help="feature store of the validation images (default: --features)")
    train_split: str | None = option(None, help="default: the dataset's train* split")
    val_split: str | None = option(None, help="default: the dataset's val* split; 'none' to skip held-out evaluation")
    tags: str = option("store", choices=TAG_SOURCES,
                       help="tag source: ground-truth labels, a feature store's predicted tags, or none")
    tag_store: Path | None = option(None, help="feature store whose predicted tags to use with --tags store "
                                               "(a stronger tagger; default: --features)")
    captions: bool = option(True, help="the caption files in the corpus")
    vqa: bool = option(True, help="VQA question+answer text in the corpus")
    # A world with many questions per image would otherwise crowd the captions out of the corpus.
    vqa_per_image: int | None = option(None, help="at most this many VQA question+answer texts per image "
                                                  "(default: all)")
    extra_captions: Path | None = option(None, help="pseudo-captions (COCO captions JSON, e.g. from `minivlm distill`)")
    extra_features: Path | None = option(None, help="feature store of the --extra-captions images")
    extra_tag_store: Path | None = option(None, help="store whose predicted tags to use for the --extra-captions "
                                                     "images (e.g. a stronger tagger's; default: --extra-features)")
    preset: str = option("minilm", choices=tuple(BERT_PRESETS), help="transformer shape (Table 2)")
    init_text: Path | None = option(None, help="text-pretrained BERT/MiniLM folder to start from (default: random)")
    dropout: float | None = option(None, help="override the preset's dropout")
    eval_examples: int = option(1000, help="held-out examples per evaluation")
    task: PretrainTaskConfig = option(default_factory=PretrainTaskConfig, help="MLM and ITM")
    train: TrainConfig = option(default_factory=lambda: TrainConfig(batch_size=32, lr=4e-4), help="trainer (paper: "
                                "batch 2048, lr 4e-4, linear decay, AdamW; configs/pretrain.toml)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setup_arguments(parser, PretrainSetup)


def run(args: argparse.Namespace) -> int:
    pretrain(setup_from_args(PretrainSetup, args))
    return 0


def pretrain(setup: PretrainSetup) -> dict:
    """Pre-trains; `setup.out / "model"` becomes a pretrain folder. Returns the last logged metrics."""
    from minivlm.data.feature_store import FeatureStore
    from minivlm.data.world import World

    rank = distributed_env()[0]
    say = tqdm.write if rank == 0 else (lambda *_: None)
    t = setup.train
    if (setup.features is None) == (setup.detector is None):
        raise MiniVLMError("pretrain needs exactly one region source: --features STORE or --detector FOLDER")
    world = World(setup.data)
    train_split = world.train_split("pretrain", setup.train_split)
    val_split = None if setup.val_split == "none" else (setup.val_split or world.val_split("pretrain"))
    if setup.detector:
        from minivlm.vision.extract import OnTheFlyRegions, world_sources
        from minivlm.vision.tee import load_detector

        store = OnTheFlyRegions(load_detector(setup.detector), world_sources(setup.data))
        say(f"[pretrain] regions extracted on the fly by {setup.detector} (kept in memory once computed)")
    else:
        store = FeatureStore(setup.features)
    tag_store = FeatureStore(setup.tag_store) if setup.tag_store else None

    cfg = get_bert(setup.preset)
    if store.feature_dim is not None:
        cfg.region_dim = store.feature_dim  # 1024 for TEE, 2048 for Oscar/VinVL stores
    if setup.dropout is not None:
        cfg.dropout = setup.dropout
    tokenizer = get_tokenizer(str(vocab_of(setup.init_text))) if setup.init_text and vocab_of(setup.init_text) else get_tokenizer()
    if tokenizer.vocab_size != cfg.vocab_size:
        cfg.vocab_size = tokenizer.vocab_size

    corpus_args = dict(tag_source=setup.tags, tag_store=tag_store, max_regions=cfg.max_regions,
                       tag_min_score=cfg.tag_min_score,
                       use_captions=setup.captions, use_vqa=setup.vqa,
                       vqa_per_image=setup.vqa_per_image)
    examples, skipped = build_corpus(world, train_split, store, **corpus_args)
    stores: list[RegionSource] = [store]
    if setup.extra_captions:
        if not setup.extra_features:
            raise MiniVLMError("--extra-captions needs --extra-features (the feature store of those images)")
        extra, extra_skipped = pseudo_caption_corpus(
            setup.extra_captions, FeatureStore(setup.extra_features), "none" if setup.tags == "none" else "store",
            cfg.max_regions, tag_store=FeatureStore(setup.extra_tag_store) if setup.extra_tag_store else None,
            tag_min_score=cfg.tag_min_score)
        stores.append(FeatureStore(setup.extra_features))
        examples += extra
        say(f"[pretrain] {len(extra)} pseudo-captions from {setup.extra_captions} ({extra_skipped} without features)")
    if not examples:
        raise MiniVLMError(f"{setup.features or setup.detector}: none of the {train_split} images has regions there")
    say(f"[pretrain] {train_split}: {len(examples)} examples, tags={setup.tags}"
        + (f" ({skipped} skipped: image not in the feature store)" if skipped else ""))
    task = setup.task
    families = word_families(world, train_split, store)
    if task.itm_swap_frac > 0 and families is None:
        raise MiniVLMError(f"{setup.features or setup.detector}: the store names no classes, so no caption word "
                           "can be swapped for --itm-swap-frac")
    train_set = PretrainDataset(examples, stores, task, families=families)
    collator = PretrainCollator(tokenizer, cfg, task)

    eval_batches: list[FusionBatch] = []
    swap_eval: list[FusionBatch] = []
    if val_split is not None:
        val_store = FeatureStore(setup.val_features) if setup.val_features else store
        val_examples, _ = build_corpus(world, val_split, val_store, **corpus_args)
        if len({e.image_key for e in val_examples}) >= 2:
            # OSCAR's negatives only, so `itm_acc` compares across settings; the swaps get their own score
            val_set = PretrainDataset(val_examples, [val_store], dataclasses.replace(task, itm_swap_frac=0.0),
                                      families=families)
            eval_batches = fixed_batches(val_set, collator, t.batch_size, setup.eval_examples, seed=t.seed + 1234)
            if families is not None:
                swap_eval = swap_batches(val_set, collator, t.batch_size, setup.eval_examples // 2, seed=t.seed + 4321)
            say(f"[pretrain] held-out {val_split}: {min(len(val_examples), setup.eval_examples)} examples")

    torch.manual_seed(t.seed)
    model = PretrainModel(cfg, task.itm_weight)
    out = Path(setup.out)
    if setup.init_text:
        report = load_text_weights(model, setup.init_text)
        say(f"[pretrain] init from text weights:\n{report.summary()}")
        if rank == 0:
            write_text(out / "init_report.txt", report.summary() + "\n")
    steps = math.ceil(len(train_set) / t.batch_size) * t.epochs
    if t.max_steps:
        steps = min(steps, t.max_steps)
    trainer = Trainer(model, t, out, desc="pretrain")
    def eval_fn(m, step):
        result = evaluate(m, eval_batches)
        if swap_eval:
            result["itm_swap_acc"] = evaluate(m, swap_eval)["itm_acc"]
        return result
    say(f"[pretrain] {setup.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
        f"{steps} steps of {t.batch_size}")
    last = trainer.fit(train_set, collator, eval_fn if eval_batches else None)
    if rank == 0:
        folder = checkpoint.write(out / "model", "pretrain", {
            "bert": to_dict(cfg), "tags": setup.tags, "train_split": train_split, "init_text": str(setup.init_text) if setup.init_text else None,
            "examples": len(train_set)}, model.state_dict(), vocab=tokenizer.vocab_path)
        write_json(out / "result.json", {"train": {k: v for k, v in last.items() if k != "eval"},
                                         "eval": last.get("eval", {}), "config": to_dict(cfg)}, indent=1)
        if "eval" in last:
            e = last["eval"]
            say(f"[pretrain] held-out MLM accuracy {e['mlm_acc']:.3f}, ITM accuracy {e['itm_acc']:.3f}"
                + (f", ITM on one-word swaps {e['itm_swap_acc']:.3f}" if "itm_swap_acc" in e else ""))
        say(f"[pretrain] model folder: {folder}")
    return last
