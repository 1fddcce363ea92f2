"""Training the captioning model: cross-entropy fine-tuning, then CIDEr-D optimisation (SCST), each a
resumable `Trainer` run (out/ce, out/scst).

SCST (second stage): for each image, `scst_samples` captions are sampled and a greedy caption is decoded
(both without gradient, in eval mode); the reward is CIDEr-D against the image's reference captions
(`minivlm.eval.caption_metrics.CiderD`, document frequencies from the training references); the baseline
is the greedy caption's reward (self-critical, the default) or the mean reward of the image's other
samples ("mean"). The loss is -advantage x log p(sample), averaged over sampled tokens, where log p comes
from one teacher-forced pass with gradient (`CaptionModel.sequence_logprobs`) that reproduces the decoder's
distribution exactly (up to the dropout of the training mode it runs in).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from minivlm.config import CAPTION_OUTPUT_VOCABS, BertConfig, CaptionTaskConfig, TrainConfig
from minivlm.data.feature_store import FeatureStore
from minivlm.data.world import World
from minivlm.errors import MiniVLMError
from minivlm.tasks.caption_data import caption_dataset_from_world, output_vocabulary, references_in_store
from minivlm.tasks.caption_model import CachedSteps, CaptionBatch, CaptionModel, predict_captions
from minivlm.tasks.decode import SpecialIds, greedy_search, strip
from minivlm.text.tokenizer import Tokenizer, get_tokenizer


@dataclass
class ScstObjective:
    """The CIDEr-D optimisation stage: while `model.scst` holds one, `CaptionModel.forward` is its `loss`."""

    reward: Callable[[list, list[str]], np.ndarray]  # (image keys, captions) -> rewards
    tokenizer: Tokenizer
    samples: int = 5
    baseline: str = "greedy"  # "greedy" (self-critical) | "mean" (mean of the image's other samples)
    max_len: int = 20

    def __post_init__(self):
        if self.baseline not in ("greedy", "mean"):
            raise MiniVLMError(f"SCST baseline must be 'greedy' or 'mean', got {self.baseline!r}")
        if self.baseline == "mean" and self.samples < 2:
            raise MiniVLMError("SCST baseline 'mean' needs at least 2 samples per image")

    def loss(self, model: CaptionModel, batch: CaptionBatch, generator: torch.Generator | None = None) -> dict[str, Any]:
        k, b = self.samples, len(batch)
        was_training = model.training
        model.eval()  # decode without dropout; the gradient pass below runs in the caller's mode
        try:
            samples = model.sample(batch.prefix, k, self.max_len, generator=generator)
            greedy = None
            if self.baseline == "greedy":
                with torch.no_grad():
                    stepper = CachedSteps(model, batch.prefix)
                    greedy, _ = greedy_search(stepper, b, self.max_len, model.ids, model.device)
        finally:
            model.train(was_training)
        tok = self.tokenizer
        keys_k = [key for key in batch.keys for _ in range(k)]
        rewards = torch.as_tensor(self.reward(keys_k, [tok.decode(s) for s in strip(samples, model.ids)]),
                                  dtype=torch.float32, device=samples.device).view(b, k)
        if greedy is not None:
            base = torch.as_tensor(self.reward(list(batch.keys), [tok.decode(s) for s in strip(greedy, model.ids)]),
                                   dtype=torch.float32, device=samples.device)[:, None]
        else:
            base = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)  # leave-one-out mean
        advantage = (rewards - base).view(-1)
        logp, valid = model.sequence_logprobs(batch.prefix.repeat(k), samples)
        loss = -(advantage[:, None] * logp).sum() / valid.sum().clamp(min=1)
        return {"loss": loss, "reward": rewards.mean(), "baseline_reward": base.mean(),
                "advantage_abs": advantage.abs().mean(), "sample_len": valid.sum(1).float().mean(),
                "samples": samples, "advantage": advantage}


def cider_reward(cider) -> Callable[[list, list[str]], np.ndarray]:
    """Wraps a `CiderD` (references of the training images) as an SCST reward function."""
    return lambda keys, captions: cider.score(list(zip(keys, captions)))[1]


def cider_eval_fn(world: World, split: str, store: FeatureStore, tokenizer: Tokenizer, max_images: int,
                  max_len: int, tags: str = "predicted") -> Callable[[nn.Module, int], dict]:
    """Held-out CIDEr-D of greedy captions on up to `max_images` images (fast, java-free: for progress)."""
    from minivlm.eval.caption_metrics import CiderD

    refs = references_in_store(world, split, store)
    keys = sorted(refs)[:max_images]
    cider = CiderD({k: refs[k] for k in keys})

    def evaluate(model: nn.Module, step: int) -> dict:
        rows = predict_captions(model, tokenizer, keys, store, max_len=max_len, tags=tags, progress=False)
        mean, _ = cider.score({r["image_id"]: r["caption"] for r in rows})
        return {"cider_d": mean, "example": rows[0]["caption"] if rows else ""}

    return evaluate


def train_caption(pretrained: str | Path | None, world: World, store: FeatureStore, out_dir: str | Path,
                  bert_cfg: BertConfig, train_cfg: TrainConfig, scst_cfg: TrainConfig | None = None, *,
                  task_cfg: CaptionTaskConfig | None = None, tokenizer: Tokenizer | None = None,
                  train_split: str | None = None, val_split: str | None = None,
                  val_images: int = 100, tags: str = "predicted", scst_baseline: str = "greedy",
                  model: CaptionModel | None = None) -> CaptionModel:
    """Cross-entropy fine-tuning (out_dir/ce), then optional SCST (out_dir/scst), each through the Trainer
    (so each stage resumes after a kill). Splits default to the World's training and validation splits of
    captions. Returns the model; the caller writes its task folder once."""
    from minivlm.eval.caption_metrics import CiderD
    from minivlm.train.trainer import Trainer

    task = task_cfg or CaptionTaskConfig()
    if task.output_vocab not in CAPTION_OUTPUT_VOCABS:
        raise MiniVLMError(f"caption output vocabulary must be one of {CAPTION_OUTPUT_VOCABS}, got {task.output_vocab!r}")
    tokenizer = tokenizer or get_tokenizer()
    out = Path(out_dir)
    train_split = train_split or world.train_split("captions")
    if val_split is None:
        val_split = world.val_split("captions")
    special = SpecialIds.from_tokenizer(tokenizer)
    if model is None:
        model = CaptionModel.from_pretrained_vl(pretrained, special) if pretrained else CaptionModel(bert_cfg, special)
    cfg = model.cfg
    max_len = min(task.max_gen_len, cfg.max_text_len - 1)
    eval_fn = (cider_eval_fn(world, val_split, store, tokenizer, val_images, max_len, tags)
               if val_split and val_images > 0 else None)

    ce_set = caption_dataset_from_world(world, train_split, store, tokenizer, cfg, task, tags)
    if task.output_vocab == "train":
        model.restrict_output(output_vocabulary(ce_set))
    Trainer(model, train_cfg, out / "ce", desc="caption-ce").fit(ce_set, ce_set.collate, eval_fn)

    if scst_cfg is not None:
        refs = references_in_store(world, train_split, store)
        model.scst = ScstObjective(cider_reward(CiderD(refs)), tokenizer, task.scst_samples, scst_baseline, max_len)
        scst_set = caption_dataset_from_world(world, train_split, store, tokenizer, cfg, task, tags, one_per_image=True)
        try:
            Trainer(model, scst_cfg, out / "scst", desc="caption-scst").fit(scst_set, scst_set.collate, eval_fn)
        finally:
            model.scst = None
    return model

