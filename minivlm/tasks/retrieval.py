"""Image-text retrieval as binary matching on [CLS] (paper Sec. 4.4).

    [CLS] caption [SEP] tags [SEP] regions -> transformer -> ITM head -> (matched, mismatched) logits

The head is the pre-training ITM head (class 1 = "text from another image"), so fine-tuning starts from
what pre-training learned; the score of a pair is the log-odds of "matched", logit[0] - logit[1].

Training pairs every caption with its image (label 0) and with `negatives_per_positive` mismatched pairs
(label 1): either the caption with another image or the image with another image's caption. A negative
is never the true pair: its image differs, and it shares no caption text with the true image (a
synthetic world or a real one can give two images the same caption). "Hard-ish" negatives: of
`hard_pool` valid candidates, the one whose words overlap the true caption most.

Evaluation scores every image x caption pair. The images' region tensors are padded once, the captions
and tag lists are tokenised once, and each batch of pairs is gathered from those caches into
`minivlm.fusion.layout.join_slots`'s fixed-width slots, which gives the same result as `build_batch`'s
compact layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from minivlm.config import BertConfig
from minivlm.data.feature_store import FeatureStore
from minivlm.errors import MiniVLMError
from minivlm.fusion.heads import ITMHead
from minivlm.fusion.inputs import FusionBatch, build_batch, collate_regions
from minivlm.fusion.layout import PairSlots
from minivlm.fusion.transformer import MultimodalBert
from minivlm.regions import Regions
from minivlm.tasks.data import Key, RegionSource, get_regions, model_device
from minivlm.tasks.task import Task
from minivlm.text.tokenizer import Tokenizer

MATCHED, MISMATCHED = 0, 1  # the ITM head's classes


def _words(text: str) -> frozenset[str]:
    return frozenset(text.lower().replace(".", " ").replace(",", " ").split())


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


# ---------------------------------------------------------------------------------------------- training data


class RetrievalDataset(Dataset):
    """Item i: caption i with its image, followed by its negatives, as (regions, text, label) triples."""

    def __init__(self, pairs: Sequence[tuple[Key, str]], store: RegionSource | None, negatives_per_positive: int = 1,
                 hard_pool: int = 1, image_negative_frac: float = 0.5):
        self.pairs = list(pairs)
        self.store = store
        self.k, self.hard_pool, self.image_negative_frac = negatives_per_positive, max(1, hard_pool), image_negative_frac
        self.image_keys = list(dict.fromkeys(k for k, _ in self.pairs))
        self.image_texts: dict[Key, set[str]] = {}
        self.image_words: dict[Key, set[str]] = {}
        for key, text in self.pairs:
            self.image_texts.setdefault(key, set()).add(_norm(text))
            self.image_words.setdefault(key, set()).update(_words(text))
        self.words = [_words(t) for _, t in self.pairs]
        if self.k and len(self.image_keys) < 2:
            raise MiniVLMError(f"retrieval training needs captions of at least 2 images for negatives, "
                               f"got {len(self.image_keys)}")

    def __len__(self) -> int:
        return len(self.pairs)

    def _valid_caption(self, key: Key, j: int) -> bool:
        other, text = self.pairs[j]
        return other != key and _norm(text) not in self.image_texts[key]

    def _valid_image(self, key: Key, other: Key) -> bool:
        return other != key and not (self.image_texts[other] & self.image_texts[key])

    def _draw(self, n: int, valid, generator: torch.Generator | None) -> list[int]:
        found: list[int] = []
        for _ in range(50 * self.hard_pool):
            j = int(torch.randint(n, (1,), generator=generator))
            if valid(j):
                found.append(j)
                if len(found) == self.hard_pool:
                    break
        if not found:  # rare: most items are invalid; search them all
            found = [j for j in range(n) if valid(j)][: self.hard_pool]
        return found

    def sample_negatives(self, i: int, generator: torch.Generator | None = None) -> list[tuple[Key, str]]:
        """`negatives_per_positive` mismatched (image key, caption) pairs for caption i."""
        key, text = self.pairs[i]
        words = self.words[i]
        out: list[tuple[Key, str]] = []
        for _ in range(self.k):
            if float(torch.rand((), generator=generator)) < self.image_negative_frac:
                cands = self._draw(len(self.image_keys), lambda j: self._valid_image(key, self.image_keys[j]), generator)
                if cands:
                    best = max(cands, key=lambda j: len(words & self.image_words[self.image_keys[j]]))
                    out.append((self.image_keys[best], text))
                    continue
            cands = self._draw(len(self.pairs), lambda j: self._valid_caption(key, j), generator)
            if not cands:
                raise MiniVLMError(f"no caption of another image differs from image {key!r}'s captions: "
                                   "cannot build a negative pair")
            best = max(cands, key=lambda j: len(words & self.words[j]))
            out.append((key, self.pairs[best][1]))
        return out

    def __getitem__(self, i: int) -> list[tuple[Regions, str, int]]:
        key, text = self.pairs[i]
        items = [(key, text, MATCHED)] + [(k, t, MISMATCHED) for k, t in self.sample_negatives(i)]
        return [(get_regions(self.store, k), t, label) for k, t, label in items]


@dataclass
class RetrievalBatch:
    inputs: FusionBatch
    labels: torch.Tensor  # [N] long: 0 matched, 1 mismatched

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class RetrievalCollator:
    def __init__(self, tokenizer: Tokenizer, cfg: BertConfig):
        self.tokenizer, self.cfg = tokenizer, cfg

    def __call__(self, items: Sequence[list[tuple[Regions, str, int]]]) -> RetrievalBatch:
        flat = [x for group in items for x in group]
        inputs = build_batch(self.tokenizer, [t for _, t, _ in flat], None, [r for r, _, _ in flat], self.cfg)
        return RetrievalBatch(inputs, torch.tensor([label for _, _, label in flat], dtype=torch.long))


# ---------------------------------------------------------------------------------------------- model


class RetrievalModel(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = MultimodalBert(cfg)
        self.itm = ITMHead(cfg)

    def logits(self, inputs: FusionBatch) -> torch.Tensor:
        return self.itm(self.bert(**inputs.model_inputs()).hidden_states)

    def scores(self, inputs: FusionBatch) -> torch.Tensor:
        """Matching score per sequence: log-odds of "matched"."""
        logits = self.logits(inputs).float()
        return logits[:, MATCHED] - logits[:, MISMATCHED]

    def forward(self, batch: RetrievalBatch) -> dict[str, torch.Tensor]:
        logits = self.logits(batch.inputs)
        acc = (logits.argmax(1) == batch.labels).float().mean()
        return {"loss": F.cross_entropy(logits.float(), batch.labels), "acc": acc.detach()}


# ---------------------------------------------------------------------------------------------- scoring


class PairEncoder:
    """Tokenised captions and tag lists (`PairSlots`) plus padded region tensors, from which any (image,
    text) pair's input is gathered without tokenising again."""

    def __init__(self, cfg: BertConfig, tokenizer: Tokenizer, regions: Sequence[Regions], texts: Sequence[str]):
        tags = [r.object_tags(cfg.max_regions, cfg.tag_min_score) for r in regions]
        self.slots = PairSlots(tokenizer, texts, tags, cfg.max_text_len, cfg.max_tag_len)
        self.feats, self.boxes, self.rmask = collate_regions(list(regions), cfg.region_dim, cfg.max_regions,
                                                                 cfg.region_min_score)

    def batch(self, image_idx: torch.Tensor, text_idx: torch.Tensor) -> FusionBatch:
        rows = self.slots.rows(image_idx.numpy(), text_idx.numpy())
        text = {name: torch.from_numpy(array) for name, array in rows.items()}
        return FusionBatch(**text, maskable=torch.zeros_like(text["text_mask"]), region_feats=self.feats[image_idx],
                           region_boxes=self.boxes[image_idx], region_mask=self.rmask[image_idx])


@torch.no_grad()
def score_all_pairs(model: RetrievalModel, tokenizer: Tokenizer, regions: Sequence[Regions], texts: Sequence[str],
                    batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """[n_images, n_texts] matching scores of every image against every text, `batch_size` pairs at a time."""
    was = model.training
    model.eval()
    enc = PairEncoder(model.cfg, tokenizer, regions, texts)
    n_i, n_t = len(regions), len(texts)
    scores = torch.empty(n_i * n_t)
    device = model_device(model)
    bar = tqdm(total=n_i * n_t, desc="score pairs", disable=not progress, leave=False, unit="pair")
    for start in range(0, n_i * n_t, batch_size):
        flat = torch.arange(start, min(start + batch_size, n_i * n_t))
        batch = enc.batch(flat // n_t, flat % n_t).to(device)
        scores[flat] = model.scores(batch).cpu()
        bar.update(len(flat))
    bar.close()
    model.train(was)
    return scores.view(n_i, n_t)


@torch.no_grad()
def score_pairs(model: RetrievalModel, tokenizer: Tokenizer, regions: Sequence[Regions], texts: Sequence[str]
                ) -> torch.Tensor:
    """Scores of the given (regions[i], texts[i]) pairs, built the plain way (`build_batch`)."""
    was = model.training
    model.eval()
    out = model.scores(build_batch(tokenizer, list(texts), None, list(regions), model.cfg).to(model_device(model)))
    model.train(was)
    return out.cpu()


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class RetrievalSet:
    image_keys: list[Key]
    texts: list[str]
    text_to_image: list[int]  # image index of each text


def retrieval_set(captions: dict[Key, Sequence[str]], store: FeatureStore, limit: int | None = None,
                  captions_per_image: int | None = None) -> tuple[RetrievalSet, int]:
    """Images (in the given order) with features and captions, at most `limit` of them; returns the set
    and the number of images skipped for lack of features."""
    keys, texts, t2i, missing = [], [], [], 0
    for key, caps in captions.items():
        if limit is not None and len(keys) >= limit:
            break
        found = store.find(key)
        caps = [c for c in caps if c.strip()][:captions_per_image]
        if found is None or not caps:
            missing += found is None
            continue
        texts += caps
        t2i += [len(keys)] * len(caps)
        keys.append(found)
    return RetrievalSet(keys, texts, t2i), missing


def chance_recall(text_to_image: Sequence[int], n_images: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K (percent) of a random ranking: IR@K = K / n_images; TR@K = P(one of the image's c captions
    is among K texts drawn from n_texts), averaged over images."""
    n_texts = len(text_to_image)
    per_image = [0] * n_images
    for i in text_to_image:
        per_image[i] += 1
    out = {}
    for k in ks:
        k_t = min(k, n_texts)
        miss = [math.comb(n_texts - c, k_t) / math.comb(n_texts, k_t) for c in per_image]
        out[f"TR@{k}"] = 100.0 * (1.0 - sum(miss) / n_images)
    for k in ks:
        out[f"IR@{k}"] = 100.0 * min(1.0, k / n_images)
    return out


# ---------------------------------------------------------------------------------------------- task


class RetrievalTask(Task):
    name, kind = "retrieval", "captions"

    def eval_splits(self):
        # One split: scoring is quadratic (every image x caption pair through the transformer). Karpathy
        # "test" is the paper's test set; fall back to another test or val split.
        held_out = self.world.eval_splits(self.kind)
        return [s for s in ("test",) if s in held_out] or [s for s in held_out if s.startswith(("test", "val"))][:1]

    def train_examples(self, split):
        pairs, missing = [], 0
        for iid, caps in self.world.caption_references(split).items():
            key = self.store.find(iid)
            if key is None:
                missing += 1
                continue
            pairs += [(key, c) for c in caps if c.strip()]
        pairs = pairs if self.setup.max_train is None else pairs[:self.setup.max_train]
        if not pairs:
            raise MiniVLMError(f"{self.setup.features}: none of the {split} images has features in this store")
        self.run.say(f"{split}: {len(pairs)} captions of {len({k for k, _ in pairs})} images, {self.setup.negatives} "
                     f"negative(s) each" + (f" ({missing} images skipped: not in the store)" if missing else ""))
        return pairs

    def examples(self, split, limit):
        rset, _ = retrieval_set(self.world.caption_references(split), self.store, limit)
        if len(rset.image_keys) < 2:
            raise MiniVLMError(f"retrieval split {split!r}: fewer than 2 images with features and captions")
        return rset

    def build_model(self, cfg):
        model = RetrievalModel(cfg)
        self.run.init(model)
        return model

    def folder_extra(self):
        return {"negatives_per_positive": self.setup.negatives}

    def dataset(self, train):
        return RetrievalDataset(train, self.store, self.setup.negatives, self.setup.hard_pool)

    def collate(self, cfg):
        return RetrievalCollator(self.run.tokenizer, cfg)

    def predict(self, model, examples):
        cfg = model.cfg
        regions = [self.store[key].confident(cfg.max_regions, cfg.region_min_score) for key in examples.image_keys]
        return score_all_pairs(model, self.run.tokenizer, regions, examples.texts, self.setup.eval_batch_size,
                               progress=self.setup.progress)

    def results_file(self, examples, results):
        return {"scores": [[round(float(v), 4) for v in row] for row in results],
                "text_to_image": examples.text_to_image, "image_ids": examples.image_keys, "texts": examples.texts}

    def score(self, split, examples, results):
        from minivlm.eval.retrieval import retrieval_metrics

        r = retrieval_metrics(results, examples.text_to_image)
        r["chance"] = chance_recall(examples.text_to_image, len(examples.image_keys))
        if "folds" in r:
            r["chance_folds"] = chance_recall([t % r["fold_size"] for t in examples.text_to_image
                                               if t < r["fold_size"]], r["fold_size"])
        return {**r, "metrics": {k: v for k, v in r["full"].items() if k != "rsum"}, "baselines": {f"chance_{k}": v for k, v in r["chance"].items()}}

    def quick_eval(self, model, split):
        examples = self.examples(split, max(2, self.setup.eval_examples // 10))  # every pair is scored: keep it small
        r = self.score(split, examples, self.predict(model, examples))
        return {"TR@1": r["full"]["TR@1"], "IR@1": r["full"]["IR@1"]}
