"""Model folders: text-pretrained BERT/MiniLM initialisation and our own saved models.

A model folder is `config.json` + `model.safetensors` (or `pytorch_model.bin`) + `vocab.txt`. Two kinds:
  * a Hugging Face BERT folder (config.json has "model_type": "bert"): BertModel or BertForPreTraining
    weights, e.g. the 6-layer MiniLM of `minivlm.text.tokenizer.minilm_checkpoint_path()`;
  * a folder written by `save_model_folder` (config.json is a `BertConfig`).
Both store weights under Hugging Face BERT names, so one rename table serves both. Our extra modules use
OSCAR's names (`bert.img_embedding`, `bert.LayerNorm` for the region projection and its norm) and the
ITM classifier is BERT's `cls.seq_relationship` (OSCAR's choice: "is the pair random" is class 1 in
both). Parameters with no BERT name (task heads) are stored as `extra.<parameter name>`.

The loader finds the transformer and heads inside any model by type (`MultimodalBert`, `MLMHead`,
`Pooler`, `ITMHead`), so a task model loads whatever it shares with the checkpoint. A shallower
checkpoint fills the first layers of a deeper model; the report says which layers were loaded and which
stayed random, and lists every shape mismatch (those parameters are left as initialised).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from minivlm.config import BertConfig, from_dict, to_dict
from minivlm.errors import DataFormatError, MiniVLMError
from minivlm.fusion.heads import ITMHead, MLMHead, Pooler
from minivlm.fusion.transformer import MultimodalBert
from minivlm.io import atomic_path, load_weights, read_json, save_weights, write_json

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


def read_checkpoint(folder: str | Path) -> dict[str, torch.Tensor]:
    """The folder's weights under canonical (Hugging Face BERT) names."""
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


def read_bert_config(folder: str | Path) -> BertConfig:
    """The BertConfig of a model folder: ours as written, or mapped from a Hugging Face config."""
    path = Path(folder) / "config.json"
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(path, "expected a JSON object")
    if "num_layers" in data:
        return from_dict(BertConfig, data)
    if data.get("model_type") != "bert" and "num_hidden_layers" not in data:
        raise DataFormatError(path, "neither a minivlm BertConfig nor a Hugging Face BERT config "
                                    "(no 'num_layers' / 'model_type': 'bert')")
    try:
        return BertConfig(
            name=str(data.get("_name_or_path") or Path(folder).name), num_layers=int(data["num_hidden_layers"]),
            hidden_size=int(data["hidden_size"]), intermediate_size=int(data["intermediate_size"]),
            num_heads=int(data["num_attention_heads"]), vocab_size=int(data["vocab_size"]),
            max_position=int(data.get("max_position_embeddings", 512)),
            type_vocab_size=int(data.get("type_vocab_size", 2)),
            dropout=float(data.get("hidden_dropout_prob", 0.1)),
            layer_norm_eps=float(data.get("layer_norm_eps", 1e-12)),
        )
    except KeyError as err:
        raise DataFormatError(path, f"missing field {err.args[0]!r}") from None


def load_text_weights(model: nn.Module, folder: str | Path, strict_heads: bool = False) -> LoadReport:
    """Copies every tensor of the folder that has a place of the same shape in `model`; returns what it did.

    Raises MiniVLMError when nothing at all could be loaded (wrong folder or wrong width)."""
    folder = Path(folder)
    ckpt = read_checkpoint(folder)
    report = LoadReport(source=str(folder))
    bert = next((m for m in model.modules() if isinstance(m, MultimodalBert)), None)
    cfg = read_bert_config(folder) if (folder / "config.json").is_file() else None
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


# ----------------------------------------------------------------------------------------------------
# Writing folders
# ----------------------------------------------------------------------------------------------------


def save_model_folder(folder: str | Path, model: nn.Module, cfg: BertConfig, vocab_path: str | Path | None = None,
                      extra_config: dict | None = None) -> Path:
    """Writes config.json (the BertConfig, plus `extra_config` under "minivlm"), model.safetensors
    (canonical names) and vocab.txt. Each file is written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(canonical_state_dict(model), folder / "model.safetensors", metadata={"format": "pt"})
    if vocab_path is None:
        from minivlm.text.tokenizer import default_vocab_path

        vocab_path = default_vocab_path()
    with atomic_path(folder / "vocab.txt") as tmp:
        shutil.copyfile(vocab_path, tmp)
    config = to_dict(cfg)
    if extra_config:
        config["minivlm"] = extra_config
    write_json(folder / "config.json", config, indent=1)
    return folder


def vocab_of(folder: str | Path) -> Path | None:
    path = Path(folder) / "vocab.txt"
    return path if path.is_file() else None

