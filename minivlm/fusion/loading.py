"""Initialising a transformer from a checkpoint folder, across model classes.

The source is a checkpoint folder (`minivlm.checkpoint`) of kind "pretrain" or "task", or a text-only
Hugging Face BERT folder ("huggingface-bert", e.g. the 6-layer MiniLM of
`minivlm.text.tokenizer.minilm_checkpoint_path()`). Its kind is read from config.json; the weights are
then brought to one meeting ground, Hugging Face BERT names: a Hugging Face folder already uses them, and
a minivlm folder is rebuilt as the module it was saved from and renamed by module type. Our extra modules
use OSCAR's names (`bert.img_embedding`, `bert.LayerNorm` for the region projection and its norm) and the
ITM classifier is BERT's `cls.seq_relationship` (OSCAR's choice: "is the pair random" is class 1 in
both). Parameters with no BERT name (task heads) are named `extra.<parameter name>`.

The loader finds the transformer and heads inside any model by type (`MultimodalBert`, `MLMHead`,
`Pooler`, `ITMHead`), so a task model loads whatever it shares with the checkpoint. A shallower
checkpoint fills the first layers of a deeper model; the report says which layers were loaded and which
stayed random, and lists every shape mismatch (those parameters are left as initialised).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from minivlm.checkpoint import HF_BERT, Checkpoint, load_state_strict, read
from minivlm.config import BertConfig
from minivlm.errors import DataFormatError, MiniVLMError
from minivlm.fusion.heads import ITMHead, MLMHead, Pooler
from minivlm.fusion.transformer import MultimodalBert
from minivlm.io import load_weights

# our attribute path inside one module -> Hugging Face BERT name
_EMBEDDINGS = {
    "embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "bert.embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight": "bert.embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias": "bert.embeddings.LayerNorm.bias",
    "region_embeddings.proj.weight": "bert.img_embedding.weight",
    "region_embeddings.proj.bias": "bert.img_embedding.bias",
    "region_embeddings.LayerNorm.weight": "bert.LayerNorm.weight",
    "region_embeddings.LayerNorm.bias": "bert.LayerNorm.bias",
}
_LAYER = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "attn_ln": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_ln": "output.LayerNorm",
}
_MLM = {
    "dense.weight": "cls.predictions.transform.dense.weight",
    "dense.bias": "cls.predictions.transform.dense.bias",
    "LayerNorm.weight": "cls.predictions.transform.LayerNorm.weight",
    "LayerNorm.bias": "cls.predictions.transform.LayerNorm.bias",
    "decoder.weight": "cls.predictions.decoder.weight",
    "decoder.bias": "cls.predictions.bias",
}
_POOLER = {"dense.weight": "bert.pooler.dense.weight", "dense.bias": "bert.pooler.dense.bias"}
_ITM = {"classifier.weight": "cls.seq_relationship.weight", "classifier.bias": "cls.seq_relationship.bias"}
_LAYER_RE = re.compile(r"^bert\.encoder\.layer\.(\d+)\.")


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)  # model parameters filled from the checkpoint
    missing: list[str] = field(default_factory=list)  # model parameters left as initialised
    mismatched: list[str] = field(default_factory=list)  # "param: checkpoint [..] vs model [..]" (left random)
    unused: list[str] = field(default_factory=list)  # checkpoint keys with no place in this model
    layers_loaded: list[int] = field(default_factory=list)
    layers_random: list[int] = field(default_factory=list)
    checkpoint_layers: int = 0
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}",
                 f"transformer layers loaded: {_ranges(self.layers_loaded)} (checkpoint has "
                 f"{self.checkpoint_layers}); left random: {_ranges(self.layers_random)}"]
        if self.mismatched:
            lines.append("shape mismatches (left random): " + "; ".join(self.mismatched))
        if self.missing:
            lines.append(f"{len(self.missing)} parameters not in the checkpoint (random): "
                         + ", ".join(_shorten(self.missing)))
        if self.unused:
            lines.append(f"{len(self.unused)} checkpoint tensors unused: " + ", ".join(_shorten(self.unused)))
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    return f"{xs[0]}-{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) and len(xs) > 1 else ",".join(map(str, xs))


def _shorten(names: list[str], n: int = 8) -> list[str]:
    return names[:n] + ([f"... (+{len(names) - n})"] if len(names) > n else [])


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Model parameter name -> checkpoint (Hugging Face BERT) name, for every parameter of `model`."""
    names: dict[str, str] = {}
    found: dict[type, str] = {}
    for prefix, module in model.named_modules():
        for kind in (MultimodalBert, MLMHead, Pooler, ITMHead):
            if isinstance(module, kind):
                if kind in found:
                    raise MiniVLMError(f"model has two {kind.__name__} modules ({found[kind]!r}, {prefix!r}); "
                                       "save/load them separately")
                found[kind] = prefix
    p = {k: (v + "." if v else "") for k, v in found.items()}
    if MultimodalBert in found:
        bert = model.get_submodule(found[MultimodalBert]) if found[MultimodalBert] else model
        for ours, theirs in _EMBEDDINGS.items():
            names[p[MultimodalBert] + ours] = theirs
        for i in range(len(bert.layers)):
            for ours, theirs in _LAYER.items():
                for leaf in ("weight", "bias"):
                    names[f"{p[MultimodalBert]}layers.{i}.{ours}.{leaf}"] = f"bert.encoder.layer.{i}.{theirs}.{leaf}"
    # an ITMHead's own pooler is found as the model's Pooler: BERT's pooler
    for kind, table in ((MLMHead, _MLM), (Pooler, _POOLER), (ITMHead, _ITM)):
        if kind in found:
            for ours, theirs in table.items():
                names[p[kind] + ours] = theirs
    params = dict(model.named_parameters())
    for name in params:
        names.setdefault(name, f"extra.{name}")
    return {k: v for k, v in names.items() if k in params}


def canonical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {theirs: params[ours].detach().cpu() for ours, theirs in canonical_names(model).items()}


# ----------------------------------------------------------------------------------------------------
# Reading folders
# ----------------------------------------------------------------------------------------------------


def _normalise_key(key: str) -> str:
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if key.startswith(("embeddings.", "encoder.", "pooler.")):
        key = "bert." + key  # BertModel checkpoints carry no "bert." prefix
    if key == "cls.predictions.decoder.bias":
        key = "cls.predictions.bias"  # the same tensor under its two Hugging Face names
    return key


def read_hf_checkpoint(folder: str | Path) -> dict[str, torch.Tensor]:
    """A Hugging Face BERT folder's weights under canonical names (safetensors, or a state dict read with
    `weights_only=True`: tensors only, no code)."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        state = load_weights(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        try:
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as err:
            raise DataFormatError(folder / "pytorch_model.bin", f"not a readable PyTorch state dict ({err})") from None
    else:
        raise DataFormatError(folder, "no model.safetensors or pytorch_model.bin in this model folder")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # a buffer, not a weight
        out.setdefault(_normalise_key(key), value)
    return out


def canonical_checkpoint(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The weights of a pretrain, task or Hugging Face BERT checkpoint under canonical names."""
    if ckpt.kind == HF_BERT:
        return read_hf_checkpoint(ckpt.folder)
    from minivlm.model import build_task_model

    if ckpt.kind == "pretrain":
        from minivlm.tasks.pretrain import PretrainModel

        source: nn.Module = PretrainModel(ckpt.bert_config())
    elif ckpt.kind == "task":
        spec = ckpt.task_spec()
        source = build_task_model(spec.task, spec.bert, len(ckpt.answers()) if spec.task == "vqa" else None,
                                  extra=spec.extra)  # its pooling: a region-attention head has more weights
    else:
        raise DataFormatError(ckpt.config_path, f"a {ckpt.kind} folder holds no transformer to initialise from")
    load_state_strict(source, ckpt.weights)
    return canonical_state_dict(source)


def load_text_weights(model: nn.Module, folder: str | Path, strict_heads: bool = False) -> LoadReport:
    """Copies every tensor of a pretrain, task or Hugging Face BERT folder that has a place of the same
    shape in `model`; returns what it did.

    Raises MiniVLMError when nothing at all could be loaded (wrong folder or wrong width)."""
    source = read(folder, "pretrain", "task", HF_BERT)
    return load_canonical(model, canonical_checkpoint(source), str(folder), source.bert_config(), strict_heads)


def load_canonical(model: nn.Module, ckpt: dict[str, torch.Tensor], folder: str, cfg: BertConfig | None = None,
                   strict_heads: bool = False) -> LoadReport:
    """`load_text_weights` on weights already under canonical names (`cfg`: theirs, to warn on differences)."""
    report = LoadReport(source=folder)
    bert = next((m for m in model.modules() if isinstance(m, MultimodalBert)), None)
    if bert is not None and cfg is not None:
        for what, theirs, ours in (("attention heads", cfg.num_heads, bert.cfg.num_heads),
                                   ("layer norm eps", cfg.layer_norm_eps, bert.cfg.layer_norm_eps)):
            if theirs != ours:
                report.warnings.append(f"{what}: checkpoint {theirs} vs model {ours}")
    ckpt_layers = sorted({int(m.group(1)) for k in ckpt if (m := _LAYER_RE.match(k))})
    report.checkpoint_layers = len(ckpt_layers)
    params = dict(model.named_parameters())
    used: set[str] = set()
    layer_ok: dict[int, bool] = {}
    with torch.no_grad():
        for ours, theirs in canonical_names(model).items():
            m = _LAYER_RE.match(theirs)
            layer = int(m.group(1)) if m else None
            if theirs not in ckpt:
                report.missing.append(ours)
                if layer is not None:
                    layer_ok[layer] = False
                continue
            used.add(theirs)
            src, dst = ckpt[theirs], params[ours]
            if tuple(src.shape) != tuple(dst.shape):
                report.mismatched.append(f"{ours} ({theirs}): checkpoint {list(src.shape)} vs model {list(dst.shape)}")
                if layer is not None:
                    layer_ok[layer] = False
                continue
            dst.copy_(src.to(dst.dtype))
            report.loaded.append(ours)
            if layer is not None:
                layer_ok.setdefault(layer, True)
    report.unused = sorted(k for k in ckpt if k not in used)
    if bert is not None:
        report.layers_loaded = [i for i in range(len(bert.layers)) if layer_ok.get(i, False)]
        report.layers_random = [i for i in range(len(bert.layers)) if not layer_ok.get(i, False)]
    if not report.loaded:
        raise MiniVLMError(f"{folder}: no tensor of this checkpoint fits the model\n{report.summary()}")
    if strict_heads and any(n.startswith("cls.") for n in report.missing):
        raise MiniVLMError(f"{folder}: heads missing from the checkpoint\n{report.summary()}")
    return report


def vocab_of(folder: str | Path) -> Path | None:
    path = Path(folder) / "vocab.txt"
    return path if path.is_file() else None

