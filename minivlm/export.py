"""`minivlm export MODEL [--out DIR] [--int8]`: a model folder -> ONNX graphs that `minivlm.edge` runs
without PyTorch, written into MODEL/onnx/ (where `MiniVLM.from_pretrained` and the inference commands
find them) unless --out names another folder.

    edge.json                format, versions, graph files, the shapes and ids the runtime needs, and
                             "weights": the sha256 of the model files exported (`minivlm.backend`)
    detector.onnx            canvas [1, 3, S, S] + resized (h, w) -> boxes, scores, labels, attributes, features
    caption_prefix.onnx      tags + regions -> per-layer keys/values (the cached prefix)
    caption_step.onnx        [previous token, [MASK]] + past keys/values -> next-token logits + present keys/values
    vqa.onnx                 question + tags + regions -> answer logits
    nlvr2.onnx               statement + tags + regions, 2B rows (left, then right) -> [B, 2] logits
    retrieval.onnx           caption + tags + regions -> matching score (log-odds)
    *.int8.onnx              with --int8: dynamically quantised copies (int8 weights, activations quantised per call)
    caption_step.int4.onnx   with --int4: the decode step with 4-bit weights (blocks of 32, int8 products)
    detector_features.onnx   with --bf16: the detector split in two, canvas -> P2..P6 (backbone + BiFPN, run in
    detector_head.onnx       bfloat16 by OpenVINO) and P2..P6 + resized (h, w) -> the five outputs above (RPN,
                             NMS, RoIAlign, region head: fp32 in onnxruntime)
    caption_weights.bin      the weights both caption graphs use, stored once as ONNX external data
    caption_weights.int8.bin (`minivlm.onnx_weights`), and their int8 graphs' (and the int4 step's) likewise
    detector_weights.bin     with --bf16: the weights detector.onnx shares with its two halves, stored once
    vocab.txt tags.txt attributes.txt answers.txt

The detector is ONE graph, NMS and RoIAlign included (ONNX NonMaxSuppression from opset 11, RoiAlign with
half-pixel "aligned" coordinates from opset 16; we export at opset 17 for LayerNormalization). It is a trace
of `TEE.detect` itself for one image (the runtime loops; images never interact in eval mode), with the
resized size as an input rather than a Python constant. Where the eager code branches on data (NMS over a
growing prefix, the FPN levels present among the RoIs), it takes a traceable form under
`torch.jit.is_tracing()` that computes the same regions. Image decoding, letterboxing and the mapping of
boxes back to original pixels stay outside the graph (numpy in `minivlm.edge`), as in `TEE.extract`.

The caption graphs mirror `CachedSteps` in `minivlm.tasks.caption_model`: the prefix (tags at positions
max_text_len.., then regions) is encoded once; every step feeds two tokens [w_{t-1}, [MASK]] with an explicit
[N, 2, Kv] attention mask, reads the logits at the [MASK] and returns the keys/values with the [MASK]'s (the
runtime masks those positions out of later steps: slicing them off copied the whole cache once more a step).
The VQA, NLVR2 and retrieval graphs are one `FusionGraph` each: the task model's own `logits` (or
`scores`) on the tensors of a `FusionBatch`.

We use PyTorch's TorchScript-based exporter (`dynamo=False`): it needs no onnxscript and handles
torchvision's nms / roi_align through their registered ONNX symbolics.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from minivlm import __version__
from minivlm.backend import ONNX_DIR, fingerprint
from minivlm.edge import EDGE_FORMAT, EDGE_VERSION, MANIFEST
from minivlm.errors import DataFormatError
from minivlm.fusion.inputs import FusionBatch
from minivlm.fusion.layout import TAG_SEGMENT, TEXT_SEGMENT
from minivlm.io import atomic_path, write_json
from minivlm.model import MiniVLM, write_lines
from minivlm.onnx_weights import share_weights

OPSET = 17
# The task model's method (on a FusionBatch) that each task graph computes; also the graph output's name.
FUSION_TASKS = {"vqa": "logits", "nlvr2": "logits", "retrieval": "scores"}
DETECTOR_OUTPUTS = ["boxes", "scores", "labels", "attributes", "features"]  # every detector graph's, in order
FUSION_INPUTS = ["input_ids", "token_type_ids", "position_ids", "text_mask", "region_feats", "region_boxes",
                 "region_mask"]
# Only the matrix products are quantised: they hold almost all the weights and time of the transformer and
# the box head; int8 convolutions (ConvInteger) run slower than fp32 ones in onnxruntime on CPU.
INT8_OPS = ["MatMul", "Gemm"]
# --int4: the decode step's weights in blocks of 32 along the input axis, each with an fp32 scale and a 4-bit zero
# point (as llama.cpp's Q4_1); the products run in int8 (accuracy level 4: activations quantised per block, VNNI).
# Symmetric blocks (no zero point) were as fast and worse: onnxruntime maps them to -7..7 and clips each block's
# largest weight, and the demo model's test CIDEr fell to 98.1% of PyTorch's with the bf16 detector (this: 100.9%).
INT4_BLOCK = 32
# The caption prefix and step graphs' common weights, stored once (`minivlm.onnx_weights`).
CAPTION_WEIGHTS, CAPTION_WEIGHTS_INT8 = "caption_weights.bin", "caption_weights.int8.bin"
# With --bf16, the one detector graph and its two halves: their common weights, stored once.
DETECTOR_WEIGHTS = "detector_weights.bin"


# ---------------------------------------------------------------------------------------------- graphs


class DetectorGraph(nn.Module):
    """`TEE.detect` for one image, the resized size an input of the graph. The model's own code runs: where
    it branches on data (NMS of a growing prefix, the FPN levels present), it takes a traceable form
    under `torch.jit.is_tracing()` that gives the same regions."""

    def __init__(self, tee: nn.Module):
        super().__init__()
        self.tee = tee

    def forward(self, canvas: torch.Tensor, image_hw: torch.Tensor):
        det = self.tee.detect(canvas, [(image_hw[0], image_hw[1])])[0]
        return tuple(det[k] for k in DETECTOR_OUTPUTS)


class DetectorFeaturesGraph(nn.Module):
    """`TEE.features`: canvas -> the FPN levels P2..P6, the part of `DetectorGraph` that may run in bfloat16."""

    def __init__(self, tee: nn.Module):
        super().__init__()
        self.tee = tee

    def forward(self, canvas: torch.Tensor):
        return tuple(self.tee.features(canvas))


class DetectorHeadGraph(nn.Module):
    """The rest of `DetectorGraph` on given FPN levels: RPN, NMS, RoIAlign and the region head (fp32). The canvas
    is an input for region heads that pool the image's pixels; the exporter drops it for those that do not."""

    def __init__(self, tee: nn.Module):
        super().__init__()
        self.tee = tee

    def forward(self, canvas: torch.Tensor, image_hw: torch.Tensor, *levels: torch.Tensor):
        det = self.tee.detect_from_features(list(levels), [(image_hw[0], image_hw[1])], canvas=canvas)[0]
        return tuple(det[k] for k in DETECTOR_OUTPUTS)


class CaptionPrefixGraph(nn.Module):
    """`CaptionModel.encode_prefix`: tag tokens (segment 1) + regions -> keys/values of every layer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.bert = model.bert

    def forward(self, input_ids, position_ids, region_feats, region_boxes, attention_mask):
        out = self.bert(input_ids=input_ids, token_type_ids=torch.full_like(input_ids, TAG_SEGMENT),
                        position_ids=position_ids, region_feats=region_feats, region_boxes=region_boxes,
                        attention_mask=attention_mask, use_cache=True)
        return tuple(t for kv in out.past_key_values for t in kv)


class CaptionStepGraph(nn.Module):
    """One `CachedSteps` call: [w_{t-1}, [MASK]] -> logits at the [MASK], and the cache with both new positions.
    `CachedSteps` drops the [MASK]'s; here that Slice copied every layer's whole cache once more a step (21% of
    an int8 step's kernel time at batch 32), so `minivlm.edge.CachedSteps` keeps it and masks it out instead."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.bert, self.mlm = model.bert, model.mlm

    def forward(self, input_ids, position_ids, attention_mask, *past):
        cache = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        out = self.bert(input_ids=input_ids, token_type_ids=torch.full_like(input_ids, TEXT_SEGMENT),
                        position_ids=position_ids, attention_mask=attention_mask, past_key_values=cache,
                        use_cache=True)
        present = tuple(t for kv in out.past_key_values for t in kv)
        return (self.mlm(out.hidden_states[:, 1]), *present)


class FusionGraph(nn.Module):
    """A task model's `logits` or `scores` (`FUSION_TASKS`) on the tensors of one `FusionBatch`."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, input_ids, token_type_ids, position_ids, text_mask, region_feats, region_boxes, region_mask):
        batch = FusionBatch(input_ids, token_type_ids, position_ids, text_mask, text_mask,  # maskable: unused here
                            region_feats, region_boxes, region_mask)
        return getattr(self.model, self.method)(batch)


# ---------------------------------------------------------------------------------------------- export


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic: dict[str, dict[int, str]]) -> None:
    # Traced with autograd on: `fusion.transformer.linear` swaps to a `W @ x.T` form for few-row CPU
    # inference, and a trace of the (few-row) example would freeze that form into every graph, where
    # onnxruntime runs it slower and its int8 quantiser cannot use MatMulInteger (3x slower steps here).
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints in shapes: the sizes we mean to fix
        torch.onnx.export(module.eval(), args, str(tmp), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def _kv_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def export_detector(model: MiniVLM, out: Path, bf16: bool = False) -> dict:
    """detector.onnx; with `bf16` also the same detector as two graphs (features, head) for `EdgeMiniVLM(bf16=True)`."""
    cfg = model.detector.cfg
    s = cfg.image_size
    canvas = torch.randn(1, 3, s, s)
    hw = torch.tensor([float(s), float(s * 3 // 4)])
    _export(DetectorGraph(model.detector), (canvas, hw), out / "detector.onnx", ["canvas", "image_hw"],
            DETECTOR_OUTPUTS, {})
    info = {"graph": "detector.onnx", "image_size": s, "region_dim": cfg.feature_dim, "max_regions": cfg.max_regions}
    if bf16:
        levels = model.detector.features(canvas)
        names = [f"p{i}" for i in range(2, 2 + len(levels))]
        _export(DetectorFeaturesGraph(model.detector), (canvas,), out / "detector_features.onnx", ["canvas"], names, {})
        _export(DetectorHeadGraph(model.detector), (canvas, hw, *levels), out / "detector_head.onnx",
                ["canvas", "image_hw", *names], DETECTOR_OUTPUTS, {})
        info["bf16"] = {"features": "detector_features.onnx", "head": "detector_head.onnx", "levels": names}
    return info


def _bert_info(cfg) -> dict:
    return {"num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "head_dim": cfg.hidden_size // cfg.num_heads,
            "region_dim": cfg.region_dim, "max_regions": cfg.max_regions, "max_text_len": cfg.max_text_len,
            "max_tag_len": cfg.max_tag_len, "tag_min_score": cfg.tag_min_score,
            "region_min_score": cfg.region_min_score, "vocab_size": cfg.vocab_size}


def export_caption(model: nn.Module, out: Path) -> dict:
    cfg = model.cfg
    layers, b, g, r = cfg.num_layers, 2, 3, 4
    ids = torch.randint(1000, 2000, (b, g))
    pos = cfg.max_text_len + torch.arange(g).expand(b, g)
    feats, boxes = torch.randn(b, r, cfg.region_dim), torch.rand(b, r, 6)
    mask = torch.ones(b, g + r, dtype=torch.bool)
    mask[1, -1] = False
    past_names = _kv_names("past", layers)
    present_names = _kv_names("present", layers)
    kv_axes = {0: "batch", 2: "cached"}
    _export(CaptionPrefixGraph(model), (ids, pos, feats, boxes, mask), out / "caption_prefix.onnx",
            ["input_ids", "position_ids", "region_feats", "region_boxes", "attention_mask"], present_names,
            {"input_ids": {0: "batch", 1: "tags"}, "position_ids": {0: "batch", 1: "tags"},
             "region_feats": {0: "batch", 1: "regions"}, "region_boxes": {0: "batch", 1: "regions"},
             "attention_mask": {0: "batch", 1: "prefix"}, **{n: kv_axes for n in present_names}})

    with torch.no_grad():
        past = CaptionPrefixGraph(model)(ids, pos, feats, boxes, mask)
    step_ids = torch.tensor([[model.ids.cls, model.ids.mask]] * b)
    step_pos = torch.tensor([[0, 1]] * b)
    step_mask = torch.ones(b, 2, g + r + 2, dtype=torch.bool)
    step_mask[:, 0, -1] = False
    _export(CaptionStepGraph(model), (step_ids, step_pos, step_mask, *past), out / "caption_step.onnx",
            ["input_ids", "position_ids", "attention_mask", *past_names], ["logits", *present_names],
            {"input_ids": {0: "batch"}, "position_ids": {0: "batch"}, "attention_mask": {0: "batch", 2: "keys"},
             "logits": {0: "batch"}, **{n: kv_axes for n in past_names},
             **{n: {0: "batch", 2: "cached_out"} for n in present_names}})
    return {"prefix": "caption_prefix.onnx", "step": "caption_step.onnx", **_bert_info(cfg)}


def export_fusion(task: str, model: nn.Module, out: Path) -> dict:
    """The VQA, NLVR2 or retrieval graph; its batch axis is free (NLVR2's holds 2 rows per pair)."""
    cfg = model.cfg
    method = FUSION_TASKS[task]
    b, t, r = 4, 7, 4
    ids = torch.randint(1000, 2000, (b, t))
    types = torch.zeros(b, t, dtype=torch.long)
    types[:, 4:] = TAG_SEGMENT
    pos = torch.arange(t).expand(b, t)
    text_mask = torch.ones(b, t, dtype=torch.bool)
    text_mask[1, t - 1] = False
    feats, boxes = torch.randn(b, r, cfg.region_dim), torch.rand(b, r, 6)
    region_mask = torch.ones(b, r, dtype=torch.bool)
    region_mask[2, r - 1] = False
    text_axes, region_axes = {0: "batch", 1: "tokens"}, {0: "batch", 1: "regions"}
    graph = f"{task}.onnx"
    _export(FusionGraph(model, method), (ids, types, pos, text_mask, feats, boxes, region_mask), out / graph,
            FUSION_INPUTS, [method], {**{n: text_axes for n in FUSION_INPUTS[:4]},
                                      **{n: region_axes for n in FUSION_INPUTS[4:]},
                                      method: {0: "pairs" if task == "nlvr2" else "batch"}})
    extra = {"num_answers": model.num_answers} if task == "vqa" else {}
    return {"graph": graph, **extra, **_bert_info(cfg)}


@contextlib.contextmanager
def _root_log_level_at_least(level: int):
    """onnxruntime's quantisers log through the root logger; raise its level for the call, then restore it."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(max(before, level))
    try:
        yield
    finally:
        root.setLevel(before)


def quantize(src: Path, dst: Path) -> None:
    """Dynamic 8-bit quantisation of the graph's matrix products (weights per channel, activations quantised
    on the fly): onnxruntime's quantiser, no calibration data needed. Weights are unsigned like the
    activations (U8U8): with signed weights (U8S8) a CPU without VNNI (AVX2 only) sums pairs of products in
    16 bits with saturation (VPMADDUBSW), and on such a machine the test model's answer scores moved by 0.37
    against fp32 (0.048 with U8U8, inside the test's 0.05; 0.07 with 7-bit weights, the other remedy)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the quantiser advises shape pre-processing (static quantisation's)
    with _root_log_level_at_least(logging.ERROR), atomic_path(dst) as tmp:
        quantize_dynamic(str(src), str(tmp), op_types_to_quantize=INT8_OPS, per_channel=True,
                         weight_type=QuantType.QUInt8)


def int8_name(graph: str) -> str:
    return graph.removesuffix(".onnx") + ".int8.onnx"


def int4_name(graph: str) -> str:
    return graph.removesuffix(".onnx") + ".int4.onnx"


def _gemm_as_matmul(model) -> None:
    """Gemm(x, W, b) -> MatMul(x, W') + b in place, W' = W or its transpose: the 4-bit quantiser takes MatMul
    only, and the MLM head's two layers trace as Gemm (its decoder is a third of a MiniLM step's weights)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes, replaced = [], set()
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        replaced.add(node.input[1])
        name = f"{node.name}.weight"
        model.graph.initializer.append(numpy_helper.from_array(weight.T.copy() if attrs.get("transB", 0) else weight, name))
        product = [f"{node.output[0]}.product"] if len(node.input) > 2 else list(node.output)
        nodes.append(helper.make_node("MatMul", [node.input[0], name], product, name=f"{node.name}.matmul"))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product[0], node.input[2]], list(node.output), name=f"{node.name}.bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {x for n in model.graph.node for x in n.input}  # a Gemm's weight may be tied to another node's input
    kept = [t for t in model.graph.initializer if t.name not in replaced or t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def quantize_int4(src: Path, dst: Path) -> None:
    """Weight-only 4-bit quantisation of the graph's matrix products (onnxruntime's MatMulNBits; no calibration
    data). For the caption step: with one image it streams every weight of the transformer for two positions,
    so its time is the weights' bytes, which 4 bits halve against int8."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  MatMulNBitsQuantizer)

    model = onnx.load(str(src))
    _gemm_as_matmul(model)
    config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=False, accuracy_level=4, bits=4)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    with _root_log_level_at_least(logging.WARNING):  # the quantiser logs every node it quantises
        quantizer.process()
    with atomic_path(dst) as tmp:
        onnx.save(quantizer.model.model, str(tmp))


def export_model(model_folder: str | Path, out: str | Path | None = None, int8: bool = False,
                 detector_int8: bool = False, bf16: bool = False, int4: bool = False) -> Path:
    """Exports a model folder's detector and every task transformer into OUT (default MODEL/onnx); returns OUT.
    `int4` (which implies `int8`) adds the caption step with 4-bit weights."""
    int8 = int8 or int4
    model_folder = Path(model_folder)
    out = model_folder / ONNX_DIR if out is None else Path(out)
    if not model_folder.is_dir():
        raise DataFormatError(model_folder, "model folder not found")
    weights = fingerprint(model_folder)  # before loading: the manifest names what was read
    model = MiniVLM.from_pretrained(model_folder, backend="torch").eval()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # until the new one is written, the folder is incomplete
    tok = model.tokenizer
    config: dict = {
        "format": EDGE_FORMAT, "version": EDGE_VERSION, "opset": OPSET,
        "versions": {"minivlm": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__},
        "source": str(model_folder.resolve()), "weights": weights,
        "special_ids": {"pad": tok.pad_id, "unk": tok.unk_id, "cls": tok.cls_id, "sep": tok.sep_id,
                        "mask": tok.mask_id},
        "files": {"vocab": "vocab.txt", "tags": "tags.txt", "attributes": "attributes.txt"},
    }
    with torch.no_grad():
        config["detector"] = export_detector(model, out, bf16)
        tasks = {}
        if "caption" in model.tasks:
            tasks["caption"] = export_caption(model.tasks["caption"], out)
        for task in FUSION_TASKS:
            if task in model.tasks:
                tasks[task] = export_fusion(task, model.tasks[task], out)
    config["tasks"] = tasks
    if int8:
        graphs = [g for t in tasks.values() for k, g in t.items() if k in ("graph", "prefix", "step")]
        graphs += [config["detector"]["graph"]] if detector_int8 else []
        for g in graphs:
            quantize(out / g, out / int8_name(g))
        config["int8"] = {g: int8_name(g) for g in graphs}
    if int4 and "caption" in tasks:
        step = tasks["caption"]["step"]
        quantize_int4(out / step, out / int4_name(step))
        config["int4"] = {step: int4_name(step)}
    if bf16:  # after quantising too (--detector-int8 reads detector.onnx self-contained)
        det = config["detector"]
        share_weights(out, [det["graph"], det["bf16"]["features"], det["bf16"]["head"]], DETECTOR_WEIGHTS)
        config["files"]["detector_weights"] = DETECTOR_WEIGHTS
    if "caption" in tasks:  # last: quantising reads the self-contained fp32 graphs
        pair = [tasks["caption"]["prefix"], tasks["caption"]["step"]]
        share_weights(out, pair, CAPTION_WEIGHTS)
        config["files"]["caption_weights"] = CAPTION_WEIGHTS
        if int8:  # the int4 step's embeddings and norms are the int8 graphs' too
            share_weights(out, [int8_name(g) for g in pair] + list(config.get("int4", {}).values()),
                          CAPTION_WEIGHTS_INT8)
            config["files"]["caption_weights_int8"] = CAPTION_WEIGHTS_INT8

    with atomic_path(out / "vocab.txt") as tmp:
        shutil.copyfile(tok.vocab_path, tmp)
    write_lines(out / "tags.txt", model.detector.class_names)
    write_lines(out / "attributes.txt", model.detector.attribute_names)
    if "vqa" in tasks:
        write_lines(out / "answers.txt", model.answers)
        config["files"]["answers"] = "answers.txt"
    write_json(out / MANIFEST, config, indent=1)  # last: a folder with edge.json is complete
    return out


# ---------------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder (MiniVLM.save_pretrained / the demo's model/)")
    parser.add_argument("--out", default=None,
                        help="folder for the graphs (default: MODEL/onnx, where the inference commands and "
                             "MiniVLM.from_pretrained use them; elsewhere, run them with minivlm.edge.EdgeMiniVLM)")
    parser.add_argument("--int8", action="store_true",
                        help="also write dynamically int8-quantised graphs (*.int8.onnx)")
    # The region head stays fp32 by default: int8 box-head layers move scores, and with them what NMS keeps.
    parser.add_argument("--detector-int8", action="store_true",
                        help="with --int8: also quantise the detector's box head (regions then differ from fp32's)")
    parser.add_argument("--int4", action="store_true",
                        help="--int8, and the caption decoder's step with 4-bit weights (*.int4.onnx), which "
                             "--int4 runs: a step with one image reads all its weights, so half the bytes is faster")
    parser.add_argument("--bf16", action="store_true",
                        help="also write the detector as two graphs, so that --bf16 runs its backbone and BiFPN in "
                             "bfloat16 (OpenVINO; CPUs with AVX512-BF16 or AMX) and the rest in fp32")


def run(args: argparse.Namespace) -> int:
    out = export_model(args.model, args.out, int8=args.int8, detector_int8=args.detector_int8, bf16=args.bf16,
                       int4=args.int4)
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".onnx")
    print(f"exported {', '.join(files)} to {out}")
    return 0
