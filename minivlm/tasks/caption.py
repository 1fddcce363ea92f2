"""The captioning task (Sec. 4.4) for the fine-tuning driver: the model (`caption_model`), its data
(`caption_data`) and its training, cross-entropy then SCST (`caption_train`), behind the Task protocol, scored
with the COCO metrics beside the most common training caption, and where the split's objects carry attributes,
with the captions' object words checked against them (`eval.caption_grounding`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any

from minivlm.config import BertConfig, CaptionTaskConfig
from minivlm.io import save_weights
from minivlm.tasks.caption_data import CaptionDataset, references_in_store
from minivlm.tasks.caption_model import CaptionModel, predict_captions
from minivlm.tasks.caption_train import train_caption
from minivlm.tasks.decode import SpecialIds
from minivlm.tasks.task import Task


class CaptionTask(Task):
    """Trained by `train_caption` (cross-entropy, then optional SCST, each resumable); scored with the COCO
    metrics beside the most common training caption given to every image."""

    name, kind = "caption", "captions"

    def train_examples(self, split):
        refs = self.world.caption_references(split)
        self.most_common = Counter(c.strip().lower() for caps in refs.values() for c in caps).most_common(1)[0][0]
        # train_caption reads the split itself (every caption: --max-train does not apply); these count it.
        return [(k, c) for k, caps in refs.items() if self.store.find(k) is not None for c in caps]

    def examples(self, split, limit):
        refs = references_in_store(self.world, split, self.store)
        keys = sorted(refs) if limit is None else sorted(refs)[:limit]
        return {k: refs[k] for k in keys}

    def build_model(self, cfg):
        special = SpecialIds.from_tokenizer(self.run.tokenizer)
        pretrained = self.setup.pretrained
        model = CaptionModel.from_pretrained_vl(pretrained, special) if pretrained else CaptionModel(cfg, special)
        self.cfg = model.cfg
        return model

    def folder_extra(self):
        return {"scst": bool(self.setup.scst_steps)}

    def task_config(self) -> CaptionTaskConfig:
        return CaptionTaskConfig(objective=self.setup.caption_objective, mask_prob=self.setup.caption_mask_prob,
                                 output_vocab=self.setup.caption_output_vocab)

    def dataset(self, train, cfg: BertConfig | None = None):
        return CaptionDataset(train, self.store, self.run.tokenizer, cfg or self.cfg, self.task_config())

    def collate(self, cfg):
        return self.dataset([], cfg).collate

    def fit(self, model, train, eval_fn):
        run, setup = self.run, self.setup
        train_cfg = setup.train_config(len(train))
        scst_cfg = None
        if setup.scst_steps:  # one row per image: the epochs that --scst-steps takes over the images
            n_images = len({k for k, _ in train})
            scst_cfg = replace(train_cfg, max_steps=setup.scst_steps, lr=train_cfg.lr / 4,
                               epochs=max(1, math.ceil(setup.scst_steps * train_cfg.batch_size / max(1, n_images))))
        val = run.eval_splits[0] if run.eval_splits else None
        run.say(f"{run.train_split}: {len(train)} captions; evaluation on {', '.join(run.eval_splits) or 'nothing'}")
        train_caption(setup.pretrained, self.world, self.store, run.out, model.cfg, train_cfg, scst_cfg,
                      tokenizer=run.tokenizer, model=model, train_split=run.train_split, val_split=val,
                      task_cfg=self.task_config(),
                      val_images=max(0, setup.eval_examples // 5) if setup.train.eval_every else 0)
        if run.rank == 0:  # the trainer's stages write under ce/ and scst/: the task folder holds the weights once
            save_weights(model.state_dict(), run.out / "model.safetensors")
        return {}

    def predict(self, model, examples):
        return predict_captions(model, self.run.tokenizer, list(examples), self.store,
                                batch_size=self.setup.eval_batch_size, beam_size=self.setup.beam_size,
                                progress=self.setup.progress)

    def score(self, split, examples, results):
        from minivlm.eval.caption_metrics import JavaError, score_captions, spice_unavailable_reason

        entry: dict[str, Any] = {}
        for name, res in (("model", results), ("baseline_most_common_caption", {k: self.most_common for k in examples})):
            meteor = name == "model"  # METEOR (java) for the model's captions only: the baseline compares on CIDEr
            try:
                entry[name] = score_captions(res, examples, meteor=meteor, spice=False)
            except JavaError:  # no java for the PTB tokenizer: score on a plain lower-cased split instead
                entry[name] = {**score_captions(res, examples, tokenizer="simple", meteor=False, spice=False),
                               "tokenizer": "simple"}
        model, base = entry["model"], entry["baseline_most_common_caption"]
        metrics = {k: model[k] for k in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr") if k in model}
        metrics["SPICE"] = model.get("SPICE")  # never a made-up number: a score or the reason it is missing
        if metrics["SPICE"] is None:
            metrics["SPICE_unavailable"] = spice_unavailable_reason() or model.get("SPICE_unavailable")
        baselines = {"baseline_most_common_caption_CIDEr": base["CIDEr"]} if "CIDEr" in base else {}
        grounding = self.grounding(split, results, examples)
        if grounding:
            entry["grounding"] = grounding
            metrics.update({k: grounding["model"].get(k) for k in ("class_precision", "colour_precision")})
            baselines["baseline_shuffled_colour_precision"] = grounding["baseline_shuffled"].get("colour_precision")
        return {**entry, "metrics": metrics, "baselines": baselines}

    def grounding(self, split, results, examples) -> dict | None:
        """Object words of the captions against the image's objects (`eval.caption_grounding`), beside the same
        captions on shuffled images and the references; None without annotated attributes for the split."""
        from minivlm.eval.caption_grounding import caption_grounding, image_objects, rotated, vocabulary

        if not self.world.instances_path(split).is_file():
            return None
        instances = self.world.instances(split)
        if not instances.attributes:
            return None
        vocab, objects = vocabulary(instances), image_objects(instances)
        captions = {r["image_id"]: r["caption"] for r in results}
        return {"model": caption_grounding(captions, objects, vocab),
                "baseline_shuffled": caption_grounding(rotated(captions), objects, vocab),
                "references": caption_grounding({k: " . ".join(v) for k, v in examples.items()}, objects, vocab)}
