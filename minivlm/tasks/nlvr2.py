"""NLVR2: is a statement true of a pair of images? (paper Sec. 4.4)

Two sequences share the statement, one per image:

    [CLS] statement [SEP] left tags [SEP] left regions   -> transformer -> pooled [CLS] \
                                                                                        concat [2H] -> 2 classes
    [CLS] statement [SEP] right tags [SEP] right regions -> transformer -> pooled [CLS] /

The left and right sequences of a batch of B pairs go through the transformer together as one batch of
2B (rows 0..B-1 left, B..2B-1 right); the order of the concatenation keeps which image is which, so
swapping the images changes the input of the classifier. Class 1 = the statement is true.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from minivlm.config import BertConfig
from minivlm.data.feature_store import FeatureStore
from minivlm.data.readers import NLVR2Example
from minivlm.fusion.heads import (POOLED_VECTORS, ClassifierHead, PickCompare, Pooler, RegionAttention, RegionCount,
                                  text_and_picked_region, text_and_picks)
from minivlm.fusion.inputs import FusionBatch, build_batch
from minivlm.fusion.transformer import MultimodalBert
from minivlm.errors import MiniVLMError
from minivlm.regions import Regions
from minivlm.batching import chunks
from minivlm.tasks.data import RegionSource, get_regions, model_device
from minivlm.tasks.task import Task
from minivlm.tasks.vqa import PICK_POOLS
from minivlm.text.tokenizer import Tokenizer


@dataclass
class NLVR2Pair:
    identifier: str
    sentence: str
    left_key: int | str  # feature-store keys of the two images
    right_key: int | str
    label: bool


def make_pairs(examples: Sequence[NLVR2Example], store: FeatureStore) -> tuple[list[NLVR2Pair], int]:
    """Pairs whose two images are in `store`; returns (pairs, number skipped for lack of features)."""
    out, missing = [], 0
    for e in examples:
        left, right = store.find(e.left_image), store.find(e.right_image)
        if left is None or right is None:
            missing += 1
            continue
        out.append(NLVR2Pair(e.identifier, e.sentence, left, right, e.label))
    return out, missing


_SIDE = re.compile(r"\b(left|right)(?=most\b|\b)", re.IGNORECASE)


def mirror_statement(text: str) -> str:
    """The statement about the mirrored pair: every "left" and "right" swapped, in the case it was written."""
    def swap(m: re.Match) -> str:
        word = {"left": "right", "right": "left"}[m.group(1).lower()]
        return word.upper() if m.group(1).isupper() else word.capitalize() if m.group(1)[0].isupper() else word
    return _SIDE.sub(swap, text)


class NLVR2Dataset(Dataset):
    """`mirror`: each item, half of the time, is the pair as seen in a mirror: the two images swapped, each
    flipped left to right, and "left" and "right" swapped in the statement, which keeps its truth (whether
    "left" names an image or a place in one). Training only."""

    def __init__(self, pairs: Sequence[NLVR2Pair], store: RegionSource, mirror: bool = False):
        self.pairs, self.store, self.mirror = list(pairs), store, mirror

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[NLVR2Pair, Regions, Regions]:
        p = self.pairs[i]
        left, right = get_regions(self.store, p.left_key), get_regions(self.store, p.right_key)
        if self.mirror and float(torch.rand(())) < 0.5:
            mirrored = replace(p, sentence=mirror_statement(p.sentence), left_key=p.right_key, right_key=p.left_key)
            return mirrored, right.mirrored(), left.mirrored()
        return p, left, right


@dataclass
class NLVR2Batch:
    inputs: FusionBatch  # 2B sequences: the B left ones, then the B right ones
    labels: torch.Tensor  # [B] long, 1 = true
    identifiers: list[str]

    def __len__(self) -> int:
        return len(self.identifiers)


def pair_inputs(tokenizer: Tokenizer, cfg: BertConfig, statements: Sequence[str], left: Sequence[Regions],
                right: Sequence[Regions]) -> FusionBatch:
    if not len(statements) == len(left) == len(right):
        raise ValueError(f"{len(statements)} statements for {len(left)} left and {len(right)} right images")
    return build_batch(tokenizer, [*statements, *statements], None, [*left, *right], cfg)


class NLVR2Collator:
    def __init__(self, tokenizer: Tokenizer, cfg: BertConfig):
        self.tokenizer, self.cfg = tokenizer, cfg

    def __call__(self, items: Sequence[tuple[NLVR2Pair, Regions, Regions]]) -> NLVR2Batch:
        inputs = pair_inputs(self.tokenizer, self.cfg, [p.sentence for p, _, _ in items], [l for _, l, _ in items],
                             [r for _, _, r in items])
        return NLVR2Batch(inputs, torch.tensor([int(p.label) for p, _, _ in items], dtype=torch.long),
                          [p.identifier for p, _, _ in items])


# What the classifier reads of each image's sequence: the pooled [CLS] (OSCAR), or the text mean beside the
# regions the statement picks (as VQA's "region-attention", `fusion.heads.text_and_picked_region`), or that and
# the soft counts of the regions the statement names (`fusion.heads.RegionCount`; most statements compare counts,
# and a count head fitted by VQA's counting questions carries over when NLVR2 starts from a VQA model), or the text
# mean beside two picks and their comparisons (VQA's "pick-compare", "pick-match" and "pick-relate",
# `fusion.heads.PickCompare`).
NLVR2_POOLS = ("cls", "region-attention", "region-count", *PICK_POOLS)


class NLVR2Model(nn.Module):
    def __init__(self, cfg: BertConfig, pool: str = "cls", null_region: bool = False):
        super().__init__()
        if pool not in NLVR2_POOLS:
            raise MiniVLMError(f"unknown NLVR2 pooling {pool!r}; choose one of: {', '.join(NLVR2_POOLS)}")
        self.cfg, self.pool, self.null_region = cfg, pool, null_region
        self.bert = MultimodalBert(cfg)
        self.pooler = Pooler(cfg)
        if pool in ("region-attention", "region-count"):
            self.region_attention = RegionAttention(cfg, null_slot=null_region)
        self.region_count = RegionCount(cfg) if pool == "region-count" else None
        if pool in PICK_POOLS:
            self.pick_compare = PickCompare(cfg, null_slot=null_region, match=pool != "pick-compare",
                                            relate=pool == "pick-relate")
        self.head = ClassifierHead(cfg, 2, in_mult=2 * POOLED_VECTORS[pool])  # both images'

    def joint(self, inputs: FusionBatch) -> torch.Tensor:
        """[2B sequences] -> [B, 2P]: the left and right pooled vectors side by side."""
        hidden = self.bert(**inputs.model_inputs()).hidden_states
        if self.pool == "cls":
            pooled = self.pooler(hidden)
        elif self.pool in PICK_POOLS:
            pooled = text_and_picks(hidden, inputs.text_mask, inputs.token_type_ids, inputs.region_mask, self.pooler,
                                    self.pick_compare, inputs.region_boxes)[0]
        else:
            pooled = text_and_picked_region(hidden, inputs.text_mask, inputs.token_type_ids, inputs.region_mask,
                                            self.pooler, self.region_attention, self.region_count)[0]
        b = pooled.shape[0] // 2
        return torch.cat([pooled[:b], pooled[b:]], dim=1)

    def logits(self, inputs: FusionBatch) -> torch.Tensor:
        return self.head(self.joint(inputs))

    def forward(self, batch: NLVR2Batch) -> dict[str, torch.Tensor]:
        logits = self.logits(batch.inputs)
        acc = (logits.argmax(1) == batch.labels).float().mean()
        return {"loss": F.cross_entropy(logits.float(), batch.labels), "acc": acc.detach()}

    @torch.no_grad()
    def predict(self, tokenizer: Tokenizer, left: Sequence[Regions], right: Sequence[Regions],
                statements: Sequence[str]) -> torch.Tensor:
        """P(statement true) [B] for one batch of image pairs."""
        inputs = pair_inputs(tokenizer, self.cfg, statements, left, right).to(model_device(self))
        return torch.softmax(self.logits(inputs).float(), dim=1)[:, 1].cpu()


@torch.no_grad()
def predict_nlvr2(model: NLVR2Model, tokenizer: Tokenizer, pairs: Sequence[NLVR2Pair], store: RegionSource,
                  batch_size: int = 64, progress: bool = True) -> list[dict]:
    """NLVR2 results `[{"identifier", "prediction", "probability"}]`."""
    was = model.training
    model.eval()
    out: list[dict] = []
    bar = tqdm(total=len(pairs), desc="nlvr2 predict", disable=not progress, leave=False)
    for chunk in chunks(pairs, batch_size):
        probs = model.predict(tokenizer, [get_regions(store, p.left_key) for p in chunk],
                              [get_regions(store, p.right_key) for p in chunk], [p.sentence for p in chunk])
        out += [{"identifier": p.identifier, "prediction": bool(pr > 0.5), "probability": round(float(pr), 5)}
                for p, pr in zip(chunk, probs)]
        bar.update(len(chunk))
    bar.close()
    model.train(was)
    return out


# ---------------------------------------------------------------------------------------------- task


class NLVR2Task(Task):
    name, kind = "nlvr2", "nlvr2"

    def __init__(self, run):
        super().__init__(run)
        if self.setup.nlvr2_features:  # NLVR2 has its own images, often extracted into their own store
            self.store = FeatureStore(self.setup.nlvr2_features)

    def train_examples(self, split):
        train, missing = make_pairs(self.world.nlvr2(split), self.store)
        train = train if self.setup.max_train is None else train[:self.setup.max_train]
        if not train:
            raise MiniVLMError(f"{self.store.root}: none of the NLVR2 {split} images has features in this store "
                               "(pass --nlvr2-features, the store `minivlm extract` wrote for nlvr2/images)")
        self.run.say(f"{split}: {len(train)} statement/pair examples"
                     + (f" ({missing} skipped: an image not in the store)" if missing else ""))
        return train

    def examples(self, split, limit):
        pairs, _ = make_pairs(self.world.nlvr2(split), self.store)
        return pairs if limit is None else pairs[:limit]

    def build_model(self, cfg):
        model = NLVR2Model(cfg, self.setup.nlvr2_pool, self.setup.region_null)
        self.run.init(model)
        return model

    def dataset(self, train):
        return NLVR2Dataset(train, self.store, mirror=self.setup.nlvr2_mirror)

    def collate(self, cfg):
        return NLVR2Collator(self.run.tokenizer, cfg)

    def predict(self, model, examples):
        return predict_nlvr2(model, self.run.tokenizer, examples, self.store, self.setup.eval_batch_size,
                             progress=self.setup.progress)

    def score(self, split, examples, results):
        from minivlm.eval.nlvr2 import nlvr2_accuracy

        kept = {p.identifier for p in examples}
        scored = [e for e in self.world.nlvr2(split) if e.identifier in kept]
        acc = nlvr2_accuracy({r["identifier"]: r["prediction"] for r in results}, scored)
        majority = sum(e.label for e in scored) / len(scored)
        baselines = {"chance": 50.0, "baseline_majority": 100.0 * max(majority, 1 - majority)}
        return {**acc, **baselines, "metrics": {"accuracy": acc["accuracy"], "consistency": acc["consistency"]},
                "baselines": baselines}

    def quick_eval(self, model, split):
        examples = self.examples(split, self.setup.eval_examples)
        return {"nlvr2_acc": self.score(split, examples, self.predict(model, examples))["accuracy"]}
