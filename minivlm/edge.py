"""Torch-free inference: `EdgeMiniVLM(folder)` runs the ONNX graphs of `minivlm export` with onnxruntime.

    model = EdgeMiniVLM("runs/demo/model/onnx")       # int8=True picks the *.int8.onnx graphs; bf16=True runs
                                                      # the detector's backbone + BiFPN in bfloat16 (OpenVINO)
    model.caption(["photo.jpg"])                      # greedy (or beam_size=3), key/value-cached
    model.answer(["photo.jpg"], ["what color is the star?"])
    model.verify(["left.png"], ["right.png"], ["both images contain a red star"])
    model.rank(images, texts)                         # [images x texts] matching scores (numpy)

`MiniVLM.from_pretrained(MODEL)` (and every inference command) returns one of these when MODEL/onnx holds
fresh graphs (`minivlm.backend`); it has the PyTorch model's API, with numpy where that one has tensors.
Needs only numpy, onnxruntime, tokenizers and Pillow; nothing here imports torch, directly or through
another minivlm module (the test suite checks `sys.modules`). Images are opened by the torch-free
`minivlm.data.images` and the input layout comes from the torch-free `minivlm.fusion.layout`, as in the
PyTorch model; the letterboxing of `minivlm.vision.tee` and the searches of `minivlm.tasks.decode`
(`minivlm.edge_decode`) are restated here in numpy, step for step; tests/test_export.py holds them to the
PyTorch originals.

    minivlm edge-caption OUT IMG [IMG ...] [--int8] [--bf16] [--json]
    minivlm edge-vqa OUT IMG "question" ["question" ...] [--int8] [--bf16] [--top K] [--json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from minivlm.batching import broadcast, chunks
from minivlm.data.images import image_to_array, load_image
from minivlm.edge_decode import beam_search, greedy_search
from minivlm.errors import DataFormatError, MiniVLMError
from minivlm.fusion.layout import PairSlots, encode_text_and_tags, pad_encoded, tag_prefix
from minivlm.text.checks import user_texts
from minivlm.text.tokenizer import Tokenizer

EDGE_FORMAT = "minivlm-edge"
EDGE_VERSION = 3  # 2: NLVR2 and retrieval graphs, the task graphs take text and region masks, "weights";
# 3: the caption step returns its [MASK]'s keys/values too
MANIFEST = "edge.json"
DEFAULT_MAX_LEN = 20


# ---------------------------------------------------------------------------------------------- images


def letterbox(image: str | Path | Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int], float, tuple[int, int]]:
    """The detector's input for one image: canvas [1, 3, size, size] (top-left aligned, zero = mean
    colour padding), the resized (h, w), the scale, and the original (w, h)."""
    pil = load_image(image)
    x, scale = image_to_array(pil, size)
    canvas = np.zeros((1, 3, size, size), dtype=np.float32)
    canvas[0, :, : x.shape[1], : x.shape[2]] = x
    return canvas, (x.shape[1], x.shape[2]), scale, pil.size


# ---------------------------------------------------------------------------------------------- regions


@dataclass
class EdgeRegions:
    """`minivlm.regions.Regions` in numpy: boxes in original pixels, features, tags."""

    boxes: np.ndarray  # [K, 4] float32
    features: np.ndarray  # [K, D] float32
    scores: np.ndarray  # [K] float32
    labels: np.ndarray  # [K] int64
    image_size: tuple[int, int]  # (w, h)
    tags: list[str] = field(default_factory=list)
    attributes: np.ndarray | None = None
    attribute_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def box_encoding(self) -> np.ndarray:
        w, h = self.image_size
        b = np.clip(self.boxes.astype(np.float32) / np.array([w, h, w, h], dtype=np.float32), 0.0, 1.0)
        return np.concatenate([b, b[:, 2:3] - b[:, 0:1], b[:, 3:4] - b[:, 1:2]], axis=1)

    def order(self, k: int, min_score: float = 0.0) -> np.ndarray:
        """Indices of the k highest scores that reach `min_score`, at least the best one (`Regions.confident`)."""
        top = np.argsort(-self.scores, kind="stable")[:k]
        return top[:max(1, int((self.scores[top] >= min_score).sum()))]

    def object_tags(self, max_regions: int, min_score: float) -> list[str]:
        """`minivlm.regions.Regions.object_tags`: confident class names among the top regions, once each."""
        return list(dict.fromkeys(self.tags[i] for i in self.order(max_regions)
                                  if self.tags[i] and self.scores[i] >= min_score))


def collate_regions(regions: Sequence[EdgeRegions], dim: int, max_regions: int, min_score: float = 0.0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`minivlm.fusion.inputs.collate_regions`: top regions of each image, padded to the batch's most.
    An all-empty batch gets one masked region: the graphs take no zero-length axis, and a masked key
    adds exactly nothing to attention (its weight underflows to 0)."""
    picks = [r.order(max_regions, min_score) for r in regions]
    n = max(1, max(len(p) for p in picks))
    feats = np.zeros((len(regions), n, dim), dtype=np.float32)
    boxes = np.zeros((len(regions), n, 6), dtype=np.float32)
    mask = np.zeros((len(regions), n), dtype=bool)
    for i, (r, p) in enumerate(zip(regions, picks)):
        if r.features.ndim != 2 or (len(r) and r.features.shape[1] != dim):
            raise MiniVLMError(f"region features of example {i} have shape {r.features.shape}; expected [K, {dim}]")
        feats[i, : len(p)] = r.features[p]
        boxes[i, : len(p)] = r.box_encoding()[p]
        mask[i, : len(p)] = True
    return feats, boxes, mask


def task_region_limits(cfg: dict) -> tuple[int, float]:
    """(max_regions, region_min_score) of a task graph's edge.json entry (exports older than the floor: 0)."""
    return cfg["max_regions"], cfg.get("region_min_score", 0.0)


def collate_task_regions(regions: Sequence[EdgeRegions], cfg: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`collate_regions` with a task graph's settings from edge.json."""
    return collate_regions(regions, cfg["region_dim"], *task_region_limits(cfg))


def prefix_inputs(tokenizer: Tokenizer, regions: Sequence[EdgeRegions], cfg: dict) -> dict[str, np.ndarray]:
    """The caption prefix graph's inputs, as `minivlm.tasks.caption_model.build_prefix` with predicted tags."""
    tags = tag_prefix(tokenizer, [r.object_tags(cfg["max_regions"], cfg["tag_min_score"]) for r in regions],
                      cfg["max_text_len"], cfg["max_tag_len"], min_len=1)  # >= 1 column: a masked pad adds nothing
    feats, boxes, rmask = collate_task_regions(regions, cfg)
    return {"input_ids": tags["tag_ids"], "position_ids": tags["tag_pos"], "region_feats": feats, "region_boxes": boxes,
            "attention_mask": np.concatenate([tags["tag_mask"], rmask], axis=1)}


def fusion_inputs(tokenizer: Tokenizer, regions: Sequence[EdgeRegions], texts: Sequence[str], cfg: dict
                  ) -> dict[str, np.ndarray]:
    """A task graph's inputs (VQA, NLVR2, retrieval), as `build_batch(tokenizer, texts, None, regions, cfg)`."""
    encoded = [encode_text_and_tags(tokenizer, q, r.object_tags(cfg["max_regions"], cfg["tag_min_score"]),
                                    cfg["max_text_len"], cfg["max_tag_len"]) for r, q in zip(regions, texts)]
    text = pad_encoded(encoded, tokenizer.pad_id)
    feats, boxes, rmask = collate_task_regions(regions, cfg)
    return {"input_ids": text["input_ids"], "token_type_ids": text["token_type_ids"],
            "position_ids": text["position_ids"], "text_mask": text["text_mask"], "region_feats": feats,
            "region_boxes": boxes, "region_mask": rmask}


# ---------------------------------------------------------------------------------------------- runtime


def _ort():
    try:
        import onnxruntime
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise MiniVLMError("onnxruntime is not installed (pip install onnxruntime)") from err
    return onnxruntime


def session_options(threads: int | None, spin: bool = True):
    """onnxruntime's options for every graph: full graph optimisation, one inter-op thread, `threads` intra-op
    threads (default: onnxruntime's choice); `spin` False: idle workers sleep instead of spin-waiting."""
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def cpu_has_bf16() -> bool:
    """Whether `--bf16` can run here: OpenVINO is installed and the CPU has bfloat16 units (AVX512-BF16 or AMX)."""
    try:
        import openvino
    except ImportError:
        return False
    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVINOGraph:
    """An ONNX graph compiled by OpenVINO's CPU plugin at one inference precision ("bf16" or "f32"), called with
    its single input. Only the detector's backbone + BiFPN runs here: OpenVINO's CPU plugin runs convolutions
    in bfloat16 on AMX / AVX512-BF16, which onnxruntime's CPU kernels do not (TEE-0 at 600 px, one thread,
    this graph 119 -> 68 ms on the Xeon with AMX, 2026-12-07)."""

    def __init__(self, path: str | Path, precision: str = "bf16", threads: int | None = None):
        try:
            import openvino
        except ImportError as err:
            raise MiniVLMError("--bf16 runs the detector's backbone with OpenVINO, which is not installed "
                               "(pip install openvino)") from err
        if precision == "bf16" and not cpu_has_bf16():
            raise MiniVLMError("this CPU has no bfloat16 units (AVX512-BF16 or AMX): run without --bf16")
        # explicit: OpenVINO's default precision on such a CPU is already bf16, and "f32" must mean fp32
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = openvino.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        out = self.request.infer({0: x})
        return [np.array(out[o]) for o in self.compiled.outputs]  # copies: the request reuses its buffers


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataFormatError(path, "file not found (run `minivlm export` again)")
    text = path.read_text(encoding="utf-8")
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def read_manifest(folder: str | Path) -> dict:
    """The edge.json of an export folder, checked to be one this runtime reads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(folder, "ONNX folder not found (write one with `minivlm export MODEL`)")
    path = folder / MANIFEST
    if not path.is_file():
        raise DataFormatError(path, "not found: not a `minivlm export` folder, or the export did not finish")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFormatError(path, f"not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != EDGE_FORMAT:
        raise DataFormatError(path, f"not an ONNX export folder (\"format\" must be {EDGE_FORMAT!r})")
    if config.get("version") != EDGE_VERSION:
        raise DataFormatError(path, f"export format version {config.get('version')!r}, this minivlm reads "
                                    f"{EDGE_VERSION}; run `minivlm export` again")
    return config


class EdgeMiniVLM:
    """The exported detector + task transformers on onnxruntime (CPU). `threads` sets onnxruntime's
    intra-op threads (default: its own choice). `bf16` runs the detector's backbone + BiFPN in bfloat16 on
    OpenVINO (`OpenVINOGraph`) and its RPN, NMS, RoIAlign and region head in fp32 on onnxruntime: regions
    then differ a little from fp32's (`benchmarks/edge.py` measures what that does to the scores)."""

    def __init__(self, folder: str | Path, int8: bool = False, threads: int | None = None, batch_size: int = 16,
                 bf16: bool = False, int4: bool = False):
        self.folder = folder = Path(folder)
        config = read_manifest(folder)
        int8 = int8 or int4  # the int4 step is the only 4-bit graph: everything else runs in int8
        self.config, self.int8, self.int4, self.bf16, self.batch_size = config, int8, int4, bf16, batch_size
        if int4 and not config.get("int4"):
            raise MiniVLMError(f"{folder}: has no int4 caption step; export with `minivlm export MODEL --int4`")
        if int8 and not config.get("int8"):
            raise MiniVLMError(f"{folder}: has no int8 graphs; export with `minivlm export MODEL --int8`")
        if bf16 and "bf16" not in config["detector"]:
            raise MiniVLMError(f"{folder}: has no split detector graphs; export with `minivlm export MODEL --bf16`")
        files = config["files"]
        self.tokenizer = Tokenizer(folder / files["vocab"])
        self.tag_names = _read_lines(folder / files["tags"])
        self.attribute_names = _read_lines(folder / files["attributes"])
        self.answers = _read_lines(folder / files["answers"]) if "answers" in files else []
        self.ids = config["special_ids"]
        self.det = config["detector"]
        self.tasks = config["tasks"]

        self._threads = threads
        self._options = session_options(threads)  # here: a missing onnxruntime fails before any work
        self._sessions: dict[str, Any] = {}
        self._head_inputs: list[str] | None = None
        for graph in self._graphs():  # every file first: a broken folder fails before any work
            if not (folder / graph).is_file():
                raise DataFormatError(folder / graph, "graph file missing from the ONNX folder (listed in edge.json)")
        for name in files.values():
            if not (folder / name).is_file():
                raise DataFormatError(folder / name, "file missing from the ONNX folder (listed in edge.json)")
        self.features = OpenVINOGraph(folder / self.det["bf16"]["features"], "bf16", threads) if bf16 else None

    def _graphs(self) -> list[str]:
        det = [self.det["bf16"]["features"], self.det["bf16"]["head"]] if self.bf16 else [self.det["graph"]]
        names = det + [g for t in self.tasks.values() for k, g in t.items() if k in ("graph", "prefix", "step")]
        return [self._pick(g) for g in names]

    def _pick(self, graph: str) -> str:
        if self.int4 and graph in self.config["int4"]:
            return self.config["int4"][graph]
        return self.config.get("int8", {}).get(graph, graph) if self.int8 else graph

    def session(self, graph: str):
        """The onnxruntime session of a graph named in edge.json (its int8 / int4 copy when set), opened once."""
        name = self._pick(graph)
        if name not in self._sessions:
            # Under --bf16 the detector head's workers must not spin-wait after a run: OpenVINO's features graph
            # runs next, on the same cores, and spinning workers held one of them (image files -> captions in
            # batches of 32 on 2 threads, paper shapes: 8.65 -> 9.87 images/s, the detector 69 -> 55 ms an image;
            # one thread has no workers to spin).
            head = self.bf16 and graph == self.det["bf16"]["head"]
            options = session_options(self._threads, spin=False) if head else self._options
            self._sessions[name] = _ort().InferenceSession(str(self.folder / name), options,
                                                           providers=["CPUExecutionProvider"])
        return self._sessions[name]

    def task(self, name: str) -> dict:
        if name not in self.tasks:
            present = ", ".join(self.tasks) or "none"
            raise MiniVLMError(f"this model has no {name} transformer (tasks present: {present}); fine-tune it with "
                               f"`minivlm finetune --task {name}`, assemble the model and export it again")
        return self.tasks[name]

    # -- images -> regions -------------------------------------------------------------------------

    def regions(self, images: Sequence[Any] | Any) -> list[EdgeRegions]:
        images = _as_list(images)
        out: list[EdgeRegions | None] = [im if isinstance(im, EdgeRegions) else None for im in images]
        todo = [i for i, r in enumerate(out) if r is None]
        pil = [load_image(images[i]) for i in todo]  # every image is checked before any work is done
        for i, im in zip(todo, pil):
            canvas, (h, w), scale, (ow, oh) = letterbox(im, self.det["image_size"])
            boxes, scores, labels, attrs, feats = self.detect(canvas, np.array([h, w], dtype=np.float32))
            boxes = boxes.astype(np.float32) / np.float32(scale)
            boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, ow)
            boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, oh)
            out[i] = EdgeRegions(boxes, feats.astype(np.float32), scores.astype(np.float32), labels.astype(np.int64),
                                 (ow, oh), [self.tag_names[j] for j in labels.tolist()], attrs.astype(np.int64),
                                 [self.attribute_names[j] for j in attrs.tolist()])
        return out  # type: ignore[return-value]

    def detect(self, canvas: np.ndarray, image_hw: np.ndarray) -> list[np.ndarray]:
        """One letterboxed canvas -> boxes, scores, labels, attributes, features (canvas pixels)."""
        if not self.bf16:
            return self.session(self.det["graph"]).run(None, {"canvas": canvas, "image_hw": image_hw})
        split = self.det["bf16"]
        feed = {"canvas": canvas, "image_hw": image_hw, **dict(zip(split["levels"], self.features(canvas)))}
        head = self.session(split["head"])
        if self._head_inputs is None:  # the canvas only if the region head pools pixels
            self._head_inputs = [i.name for i in head.get_inputs()]
        return head.run(None, {name: feed[name] for name in self._head_inputs})

    # -- captioning ----------------------------------------------------------------------------------

    def caption(self, images: Sequence[Any] | Any, beam_size: int = 1, max_len: int | None = None,
                min_len: int = 0) -> list[str]:
        return [self.tokenizer.decode(s) for s in self.caption_ids(images, max_len, min_len, beam_size)]

    def caption_ids(self, images: Sequence[Any] | Any, max_len: int | None = None, min_len: int = 0,
                    beam_size: int = 1) -> list[list[int]]:
        """Caption token ids per image (no [CLS] / [SEP]), as `CaptionModel.generate`: greedy when
        beam_size is 1."""
        cfg = self.task("caption")
        if max_len is None:
            max_len = min(DEFAULT_MAX_LEN, cfg["max_text_len"] - 1)
        if not 1 <= max_len <= cfg["max_text_len"] - 1:
            raise MiniVLMError(f"max_len {max_len} must be in [1, {cfg['max_text_len'] - 1}]")
        if beam_size < 1:
            raise MiniVLMError(f"beam_size must be at least 1, got {beam_size}")
        regions = self.regions(images)
        out: list[list[int]] = []
        for start in range(0, len(regions), self.batch_size):
            batch = regions[start:start + self.batch_size]
            steps = CachedSteps(self, cfg, batch, beam_size)
            if beam_size == 1:
                out += greedy_search(steps, len(batch), max_len, self.ids, min_len)
            else:
                out += beam_search(steps, len(batch), beam_size, max_len, self.ids, min_len)
        return out

    # -- VQA -------------------------------------------------------------------------------------------

    def answer_logits(self, images: Sequence[Any] | Any, questions: Sequence[str] | str) -> np.ndarray:
        """[N, num_answers] logits, one row per question (one image per question, or one for all)."""
        cfg = self.task("vqa")
        questions = user_texts(questions, "question", self.tokenizer, cfg["max_text_len"])
        regions = broadcast(self.regions(images), len(questions), "images", "questions")
        out = [self._run(cfg, fusion_inputs(self.tokenizer, r, q, cfg))
               for r, q in zip(chunks(regions, self.batch_size), chunks(questions, self.batch_size))]
        return np.concatenate(out, axis=0) if out else np.zeros((0, cfg["num_answers"]), dtype=np.float32)

    def answer_scores(self, images: Sequence[Any] | Any, questions: Sequence[str] | str,
                      top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The `top_k` answers with sigmoid confidences (ranked by logit, so saturated confidences keep
        their order)."""
        logits = self.answer_logits(images, questions).astype(np.float32)
        conf = 1.0 / (1.0 + np.exp(-logits))
        order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
        return [[(self.answers[int(i)], float(c[i])) for i in row] for row, c in zip(order, conf)]

    def answer(self, images: Sequence[Any] | Any, questions: Sequence[str] | str) -> list[str]:
        return [s[0][0] for s in self.answer_scores(images, questions, top_k=1)]

    # -- NLVR2 -----------------------------------------------------------------------------------------

    def verify_proba(self, left: Sequence[Any] | Any, right: Sequence[Any] | Any,
                     statements: Sequence[str] | str) -> list[float]:
        """P(statement is true of the pair (left[i], right[i]))."""
        cfg = self.task("nlvr2")
        statements = user_texts(statements, "statement", self.tokenizer, cfg["max_text_len"])
        lr = broadcast(self.regions(left), len(statements), "left images", "statements")
        rr = broadcast(self.regions(right), len(statements), "right images", "statements")
        out: list[float] = []
        for a, b, s in zip(chunks(lr, self.batch_size), chunks(rr, self.batch_size),
                           chunks(statements, self.batch_size)):
            # the graph's 2B sequences: the B left ones, then the B right ones (`nlvr2.pair_inputs`)
            logits = self._run(cfg, fusion_inputs(self.tokenizer, [*a, *b], [*s, *s], cfg)).astype(np.float32)
            out += [float(p) for p in 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))]  # softmax(logits)[:, 1]
        return out

    def verify(self, left: Sequence[Any] | Any, right: Sequence[Any] | Any, statements: Sequence[str] | str
               ) -> list[bool]:
        return [p > 0.5 for p in self.verify_proba(left, right, statements)]

    # -- retrieval -------------------------------------------------------------------------------------

    def rank(self, images: Sequence[Any] | Any, texts: Sequence[str] | str) -> np.ndarray:
        """[n_images, n_texts] matching scores (log-odds that text t describes image i), as
        `retrieval.score_all_pairs`: texts and tags tokenised once, pairs gathered in batches."""
        cfg = self.task("retrieval")
        texts, regions = user_texts(texts, "text", self.tokenizer, cfg["max_text_len"], allow_empty=True), self.regions(images)
        n_i, n_t = len(regions), len(texts)
        scores = np.zeros(n_i * n_t, dtype=np.float32)
        if not scores.size:
            return scores.reshape(n_i, n_t)
        slots = PairSlots(self.tokenizer, texts, [r.object_tags(cfg["max_regions"], cfg["tag_min_score"])
                                                  for r in regions], cfg["max_text_len"], cfg["max_tag_len"])
        feats, boxes, rmask = collate_task_regions(regions, cfg)
        for flat in chunks(np.arange(n_i * n_t), max(64, self.batch_size)):
            i, t = flat // n_t, flat % n_t
            rows = slots.rows(i, t)
            scores[flat] = self._run(cfg, {"input_ids": rows["input_ids"], "token_type_ids": rows["token_type_ids"],
                                           "position_ids": rows["position_ids"], "text_mask": rows["text_mask"],
                                           "region_feats": feats[i], "region_boxes": boxes[i], "region_mask": rmask[i]})
        return scores.reshape(n_i, n_t)

    def retrieve(self, images: Sequence[Any], query: str, top_k: int = 5) -> list[tuple[int, float]]:
        """The `top_k` (image index, score) best matching the text query, best first."""
        scores = self.rank(images, user_texts(query, "query"))[:, 0]
        best = np.argsort(-scores, kind="stable")[:top_k]
        return [(int(i), float(scores[i])) for i in best]

    def _run(self, cfg: dict, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session(cfg["graph"]).run(None, inputs)[0]


class CachedSteps:
    """`minivlm.tasks.caption_model.CachedSteps` on the graphs: the prefix (tags + regions) is encoded once, and
    each call feeds [previous token, [MASK]] with the explicit past keys/values (a stepper of edge_decode). The
    step graph returns both new positions' keys/values, so the cache holds each earlier step's [MASK] too, masked
    out of every later step: a masked key adds exactly nothing, and the graph copies the cache once a step, not
    twice."""

    def __init__(self, model: EdgeMiniVLM, cfg: dict, regions: Sequence[EdgeRegions], expand: int = 1):
        prefix = prefix_inputs(model.tokenizer, regions, cfg)
        self.valid = prefix["attention_mask"]
        self.past = model.session(cfg["prefix"]).run(None, prefix)
        if expand > 1:  # beam search: `expand` rows per image, image-major
            self.valid = np.repeat(self.valid, expand, axis=0)
            self.past = [np.repeat(p, expand, axis=0) for p in self.past]
        self.step = model.session(cfg["step"])
        self.names = [f"past.{i}.{kv}" for i in range(cfg["num_layers"]) for kv in ("key", "value")]
        self.mask_id = model.ids["mask"]
        self.seen = 0  # caption tokens in the cache (each with its step's [MASK] after it)

    def __call__(self, last: np.ndarray) -> np.ndarray:
        n, t = len(last), self.seen + 1
        before = np.concatenate([self.valid, np.tile(np.array([True, False]), (n, self.seen))], axis=1)
        new = np.array([[True, False], [True, True]])  # the token sees itself; the [MASK] sees both
        mask = np.concatenate([np.broadcast_to(before[:, None, :], (n, 2, before.shape[1])),
                               np.broadcast_to(new, (n, 2, 2))], axis=2)
        feeds = {"input_ids": np.stack([last, np.full(n, self.mask_id, dtype=np.int64)], axis=1).astype(np.int64),
                 "position_ids": np.broadcast_to(np.array([t - 1, t], dtype=np.int64), (n, 2)).copy(),
                 "attention_mask": np.ascontiguousarray(mask), **dict(zip(self.names, self.past))}
        logits, *self.past = self.step.run(None, feeds)
        self.seen += 1
        return logits

    def reorder(self, rows: np.ndarray) -> None:
        self.past = [p[rows] for p in self.past]
        self.valid = self.valid[rows]


def _as_list(images: Any) -> list:
    return [images] if isinstance(images, (str, Path, Image.Image, EdgeRegions)) else list(images)


# ---------------------------------------------------------------------------------------------- commands


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("model", help="folder written by `minivlm export` (MODEL/onnx, or its --out)")
    if name == "edge-caption":
        parser.add_argument("images", nargs="+", help="image files")
    elif name == "edge-vqa":
        parser.add_argument("image", help="image file")
        parser.add_argument("questions", nargs="+", help="one or more questions about the image")
        parser.add_argument("--top", type=int, default=1, help="answers to show per question")
    else:
        raise ValueError(f"minivlm.edge serves edge-caption and edge-vqa, not {name!r}")
    parser.add_argument("--int8", action="store_true", help="run the int8 graphs (export --int8)")
    parser.add_argument("--int4", action="store_true", help="--int8 with the 4-bit caption step (export --int4)")
    parser.add_argument("--bf16", action="store_true",
                        help="run the detector's backbone in bfloat16 with OpenVINO (export --bf16; AVX512-BF16 / AMX)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    model = EdgeMiniVLM(args.model, int8=args.int8, threads=args.threads, bf16=args.bf16, int4=args.int4)
    if args.command == "edge-caption":
        caps = model.caption([str(p) for p in args.images])
        doc: Any = [{"image": str(p), "caption": c} for p, c in zip(args.images, caps)]
        lines = [f"{p}: {c}" for p, c in zip(args.images, caps)]
    else:
        scores = model.answer_scores([args.image], args.questions, top_k=max(1, args.top))
        doc = [{"question": q, "answers": [{"answer": a, "score": s} for a, s in best]}
               for q, best in zip(args.questions, scores)]
        lines = [f"{q} -> " + ", ".join(f"{a} ({s:.2f})" for a, s in best) for q, best in zip(args.questions, scores)]
    print(json.dumps(doc, indent=1, ensure_ascii=False) if args.json else "\n".join(lines))
    return 0

