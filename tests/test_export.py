"""The fast path: `minivlm export MODEL` writes ONNX graphs into MODEL/onnx, `MiniVLM.from_pretrained` (and
every inference command) runs them with onnxruntime and no PyTorch while they are fresh, and they give the
PyTorch model's regions, captions (token for token, greedy and beam), VQA answers, NLVR2 labels and retrieval
ranking."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from minivlm.config import BertConfig, get_tee
from minivlm.edge import cpu_has_bf16
from minivlm.errors import DataFormatError, MiniVLMError
from minivlm.model import MiniVLM, build_task_model
from minivlm.regions import Regions
from minivlm.text.tokenizer import get_tokenizer

BERT = BertConfig("tiny", num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2, vocab_size=30522,
                  dropout=0.0, region_dim=16, max_regions=4, max_text_len=10, max_tag_len=6)
# rpn_post_nms_topk and max_regions above what NMS keeps: proposal and region counts vary from image to image,
# so a count frozen into the detector graph by its trace would show. The region head pools the image too, as
# the demo's detector does: the graph must carry that second RoIAlign.
TEE_CFG = dataclasses.replace(get_tee("tee-demo"), image_size=128, fpn_channels=16, fpn_layers=1, rpn_pre_nms_topk=100,
                              rpn_post_nms_topk=300, max_regions=40, region_dim=16, num_classes=3, num_attributes=2,
                              roi_image_pool=True)
ANSWERS = ["yes", "no", "red", "two", "blue"]
QUESTIONS = ["what color is it?", "is there a star?", "how many?", "what shape is on the left?"]
STATEMENTS = ["both images have a red star", "the left image has two circles", "there is a square", "no blue"]
TEXTS = ["a red circle", "two blue squares and a star", "", "a square"]
TASKS = ("caption", "vqa", "nlvr2", "retrieval")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from minivlm.cli import main
    from minivlm.vision.tee import TEE

    root = tmp_path_factory.mktemp("edge")
    torch.manual_seed(0)
    detector = TEE(TEE_CFG, ["circle", "square", "star"], ["red", "blue"])
    for p in detector.roi_head.parameters():  # visible score gaps, so regions do not hinge on rounding
        p.data.normal_(0, 0.2) if p.dim() > 1 else None
    # VQA with the demo's region-attention pooling: its masked mean and masked softmax over the regions must
    # trace into the graph with dynamic lengths (and no regions at all), with its null slot as the demo has it.
    tasks = {t: build_task_model(t, BERT, len(ANSWERS) if t == "vqa" else None,
                                 extra={"pool": "region-attention", "null_region": True} if t == "vqa" else None)
             for t in TASKS}
    for m in tasks.values():  # larger than BERT's init: different inputs give visibly different outputs
        for p in m.parameters():
            p.data.normal_(0, 0.3) if p.dim() > 1 else None
    model = MiniVLM(detector, tasks, get_tokenizer(), ANSWERS).eval()
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(120, 90), (64, 100), (100, 100), (37, 150)]):
        paths.append(root / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    # Random NLVR2 weights say "true" (or "false") to every test pair: move the decision threshold between
    # the two middle pairs, so both labels occur and neither sits at 0.5.
    p = np.sort(model.verify_proba(paths, paths[1:] + paths[:1], STATEMENTS))
    odds = np.log(p / (1 - p))
    with torch.no_grad():
        tasks["nlvr2"].head.net[-1].bias[1] -= float(odds[1] + odds[2]) / 2
    model.save_pretrained(root / "model")
    assert main(["export", str(root / "model"), "--int4", "--bf16"]) == 0  # into model/onnx; --int4 writes int8 too
    return root, model, paths


@pytest.fixture(scope="module")
def edge(env):
    from minivlm.edge import EdgeMiniVLM

    model = MiniVLM.from_pretrained(env[0] / "model", threads=1)  # backend "auto": the fresh graphs
    assert isinstance(model, EdgeMiniVLM)
    model.batch_size = 3  # batches of 3: one full, one partial
    return model


def test_letterbox_matches_torch_exactly(tmp_path):
    # Both paths open images with minivlm.data.images; the numpy canvas must equal the torch one.
    from minivlm import edge
    from minivlm.vision.tee import letterbox, pad_to_canvas

    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 255, (40, 70, 4), dtype=np.uint8), "RGBA")
    grey16 = Image.fromarray(rng.integers(0, 65535, (50, 30), dtype=np.uint16))
    pal = Image.fromarray(rng.integers(0, 255, (33, 33), dtype=np.uint8), "L").convert("P")
    pal.info["transparency"] = 3
    images = [rgba, grey16, pal, Image.fromarray(rng.integers(0, 255, (91, 13, 3), dtype=np.uint8))]
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i}.png")
        for src in (im, tmp_path / f"{i}.png"):
            canvas, hw, s, size = edge.letterbox(src, 128)
            lt, ls, lsize = letterbox(src, 128)
            assert np.array_equal(pad_to_canvas([lt], 128).numpy(), canvas)
            assert (s, size, hw) == (ls, lsize, tuple(lt.shape[1:]))


def test_multilevel_roi_align_graph_runs_with_any_number_of_boxes_per_level(tmp_path):
    """Traced where one level holds exactly one box, the graph must still pool images with none or several
    there: an assignment into the output once exported a Reshape to that one box's shape, and the demo's
    detector graph failed on every image without a box on that level."""
    import onnxruntime as ort

    from minivlm.vision.roi_head import multilevel_roi_align

    class Pool(torch.nn.Module):
        def forward(self, f2, f3, f4, boxes, levels):
            return multilevel_roi_align([f2, f3, f4], [boxes], 2, levels, 4, 2)

    torch.manual_seed(0)
    feats = [torch.randn(1, 8, 64 // 2**k, 64 // 2**k) for k in range(3)]
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 40, 40], [8, 8, 30, 30], [0, 0, 60, 60], [10, 20, 50, 60]])
    levels = torch.tensor([2, 3, 3, 4, 4])  # level 2: one box
    torch.onnx.export(Pool(), (*feats, boxes, levels), tmp_path / "pool.onnx", dynamo=False,
                      input_names=["f2", "f3", "f4", "boxes", "levels"], output_names=["pooled"],
                      dynamic_axes={"boxes": {0: "r"}, "levels": {0: "r"}, "pooled": {0: "r"}})
    session = ort.InferenceSession(str(tmp_path / "pool.onnx"), providers=["CPUExecutionProvider"])
    for lv in ([3, 3, 4, 4, 4], [2, 2, 3, 4, 4], [4, 4, 4, 4, 4], [2, 3, 3, 3, 3]):
        lv = torch.tensor(lv)
        got = session.run(None, {"f2": feats[0].numpy(), "f3": feats[1].numpy(), "f4": feats[2].numpy(),
                                 "boxes": boxes.numpy(), "levels": lv.numpy()})[0]
        np.testing.assert_allclose(got, Pool()(*feats, boxes, lv).numpy(), atol=1e-5)


def test_export_folder_lists_every_graph_and_the_weights(env):
    from minivlm.backend import fingerprint

    root = env[0]
    config = json.loads((root / "model" / "onnx" / "edge.json").read_text())
    assert config["format"] == "minivlm-edge" and set(config["tasks"]) == set(TASKS)
    assert config["weights"] == fingerprint(root / "model")
    assert set(config["weights"]) == {"config.json", "model.safetensors", "vocab.txt", "answers.txt"}
    names = sorted(p.name for p in (root / "model" / "onnx").iterdir())
    graphs = ["caption_prefix", "caption_step", "detector", "nlvr2", "retrieval", "vqa"]
    assert names == sorted(["answers.txt", "attributes.txt", "edge.json", "tags.txt", "vocab.txt",
                            "caption_weights.bin", "caption_weights.int8.bin"]
                           + [f"{g}.onnx" for g in graphs]
                           + [f"{g}.int8.onnx" for g in graphs if g != "detector"]  # the region head stays fp32
                           + ["caption_step.int4.onnx"]
                           + ["detector_features.onnx", "detector_head.onnx", "detector_weights.bin"])  # --bf16


def test_the_caption_graphs_share_one_copy_of_their_weights(env):
    """Both caption graphs (and both int8 ones) read their large initialisers from one external-data file,
    each tensor stored once: the graph files hold only small tensors and structure."""
    import onnx

    folder = env[0] / "model" / "onnx"
    # fp32: the prefix's matrices are all the step's (each layer's query/key/value product, and the rest of every
    # layer but the last, dead in a graph whose outputs are keys and values); int8: this tiny model's int8
    # matrices are under the 4 KiB threshold, its fp32 embedding tables are not
    for suffix, weights, least in ((".onnx", "caption_weights.bin", 2 * BERT.num_layers),
                                   (".int8.onnx", "caption_weights.int8.bin", 1)):
        graphs = [onnx.load(str(folder / f"caption_{g}{suffix}"), load_external_data=False) for g in ("prefix", "step")]
        external = [{t.name: {e.key: e.value for e in t.external_data} for t in g.graph.initializer
                     if t.data_location == onnx.TensorProto.EXTERNAL} for g in graphs]
        assert all(x["location"] == weights for ext in external for x in ext.values())
        shared = set(external[0]) & set(external[1])
        assert len(shared) >= least
        if suffix == ".onnx":
            assert shared == set(external[0])
        assert all(external[0][n] == external[1][n] for n in shared)  # the same bytes of the file
        spans = sorted({(int(x["offset"]), int(x["length"])) for ext in external for x in ext.values()})
        assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no tensor stored twice
        size = (folder / weights).stat().st_size
        assert size >= sum(length for _, length in spans)
        assert all((folder / f"caption_{g}{suffix}").stat().st_size < size / 4 for g in ("prefix", "step"))


def test_share_weights_keeps_what_each_graph_computes(tmp_path):
    """Two graphs holding the same matrix under different names (and a second, different one) compute the
    same after sharing, from a weights file holding the common matrix once."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from minivlm.onnx_weights import share_weights

    rng = np.random.default_rng(0)
    w, v = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal((32, 48)).astype(np.float32)

    def graph(path, names, second):
        nodes = [helper.make_node("MatMul", ["x", names[0]], ["h"])]
        inits = [numpy_helper.from_array(w, names[0])]
        if second:
            nodes.append(helper.make_node("MatMul", ["h", names[1]], ["y"]))
            inits.append(numpy_helper.from_array(v, names[1]))
        else:
            nodes.append(helper.make_node("Identity", ["h"], ["y"]))
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    graph(tmp_path / "a.onnx", ["w_in_a"], False)
    graph(tmp_path / "b.onnx", ["onnx::MatMul_7", "v"], True)
    x = rng.standard_normal((3, 64)).astype(np.float32)

    def run(name):
        return ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = [run("a.onnx"), run("b.onnx")]
    report = share_weights(tmp_path, ["a.onnx", "b.onnx"], "w.bin")
    assert report["tensors"] == 2 and report["saved"] == w.nbytes
    after = [run("a.onnx"), run("b.onnx")]
    assert all(np.array_equal(p, q) for p, q in zip(before, after))
    b = onnx.load(str(tmp_path / "b.onnx"), load_external_data=False)
    assert {t.name for t in b.graph.initializer} == {"w_in_a", "v"} and b.graph.node[0].input[1] == "w_in_a"
    assert (tmp_path / "a.onnx").stat().st_size < 1000 and (tmp_path / "w.bin").stat().st_size >= w.nbytes + v.nbytes


def test_transformer_weights_are_the_right_hand_matmul_operand(env):
    """x @ W everywhere (what onnxruntime's int8 MatMulInteger quantises), whatever eager form the trace saw."""
    import onnx

    for name in ("caption_prefix.onnx", "caption_step.onnx", "vqa.onnx", "nlvr2.onnx", "retrieval.onnx"):
        graph = onnx.load(str(env[0] / "model" / "onnx" / name)).graph
        weights = {t.name for t in graph.initializer}
        matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & weights]
        assert matmuls and all(n.input[0] not in weights for n in matmuls), name


def test_query_key_and_value_are_one_product_per_layer(env):
    """Exported graphs compute each layer's queries, keys and values with one [H, 3H] product: a decoding step has
    fewer nodes and its int8 form quantises the layer's input once (the eager model keeps three Linear layers)."""
    import onnx
    from onnx import numpy_helper

    h = BERT.hidden_size
    for name in ("caption_step.onnx", "vqa.onnx"):
        model = onnx.load(str(env[0] / "model" / "onnx" / name))
        shapes = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer}
        products = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in shapes]
        assert sum(shapes[n.input[1]] == (h, 3 * h) for n in products) == BERT.num_layers, name


def test_the_same_public_api():
    import inspect

    from minivlm.edge import EdgeMiniVLM

    for name in ("regions", "answer", "answer_scores", "verify", "verify_proba", "rank", "retrieve"):
        ours, theirs = inspect.signature(getattr(EdgeMiniVLM, name)), inspect.signature(getattr(MiniVLM, name))
        assert list(ours.parameters) == list(theirs.parameters), name
    assert list(inspect.signature(EdgeMiniVLM.caption).parameters)[:3] == ["self", "images", "beam_size"]


def test_detector_matches_pytorch(env, edge):
    _, model, paths = env
    for t, e in zip(model.regions(paths), edge.regions(paths)):
        assert len(t) == len(e) > 0 and e.image_size == t.image_size
        assert t.tags == e.tags and t.attribute_names == e.attribute_names
        np.testing.assert_array_equal(t.labels.numpy(), e.labels)
        np.testing.assert_allclose(t.boxes.numpy(), e.boxes, atol=1e-3)
        np.testing.assert_allclose(t.scores.numpy(), e.scores, atol=1e-5)
        np.testing.assert_allclose(t.features.numpy(), e.features, atol=1e-4, rtol=1e-4)


def test_greedy_captions_identical_token_for_token(env, edge):
    from minivlm.tasks.caption_model import build_prefix

    _, model, paths = env
    cap = model.tasks["caption"]
    prefix = build_prefix(model.tokenizer, model.regions(paths), cap.cfg)
    for max_len in (None, 4):
        want = cap.generate(prefix, max_len=max_len)
        assert edge.caption_ids(paths, max_len=max_len) == want
        assert any(want) and len({tuple(w) for w in want}) > 1  # the test would catch a constant output
    assert edge.caption(paths) == model.caption(paths)
    assert edge.caption_ids(paths[:1], max_len=5, min_len=5) == cap.generate(prefix.select(torch.tensor([0])),
                                                                             max_len=5, min_len=5)


def test_beam_captions_identical_token_for_token(env, edge):
    from minivlm.tasks.caption_model import build_prefix

    _, model, paths = env
    cap = model.tasks["caption"]
    prefix = build_prefix(model.tokenizer, model.regions(paths), cap.cfg)
    for beam in (2, 3):
        want = cap.generate(prefix, beam_size=beam)
        assert edge.caption_ids(paths, beam_size=beam) == want
        assert want != cap.generate(prefix)  # beam search found other captions than greedy: the test has teeth
    assert edge.caption(paths, beam_size=3) == model.caption(paths, beam_size=3)


def test_rows_that_end_leave_the_batch_with_the_same_captions(edge, env):
    """The graphs' KV caches survive rows leaving the batch (edge_decode's pruning): captions that end at
    different steps come out the same with and without pruning, for fewer rows fed. This model's own
    captions all run to max_len, so a large [SEP] logit ends image i's rows at step 2 i + 2."""
    from minivlm.edge import CachedSteps
    from minivlm.edge_decode import beam_search, greedy_search

    class EndEarly:
        def __init__(self, steps, n, beam):
            self.steps, self.image, self.step, self.fed = steps, np.repeat(np.arange(n), beam), 0, 0

        def __call__(self, last):
            logits = self.steps(last)
            self.step += 1
            self.fed += len(last)
            logits[2 * self.image + 2 <= self.step, edge.ids["sep"]] = logits.max() + 10.0
            return logits

        def reorder(self, rows):
            self.steps.reorder(rows)
            self.image = self.image[rows]

    regions, cfg = edge.regions(env[2]), edge.task("caption")
    for beam in (1, 3):
        runs = {}
        for prune in (True, False):
            steps = EndEarly(CachedSteps(edge, cfg, regions, beam), len(regions), beam)
            if beam == 1:
                caps = greedy_search(steps, len(regions), 9, edge.ids, prune=prune)
            else:
                caps = beam_search(steps, len(regions), beam, 9, edge.ids, prune=prune)
            runs[prune] = caps, steps.fed
        assert runs[True][0] == runs[False][0]
        assert [len(c) for c in runs[True][0]] == [1, 3, 5, 7]
        assert runs[True][1] == beam * (4 + 3 + 2 + 1) * 2 < runs[False][1] == beam * 4 * 8


def test_images_without_regions_or_tags(env, edge):
    """Empty region sets take the padded-prefix path of the runtime; PyTorch drops those inputs instead."""
    from minivlm.edge import EdgeRegions

    _, model, paths = env
    full = model.regions(paths[:1])[0]
    empty = Regions(torch.zeros(0, 4), torch.zeros(0, 16), torch.zeros(0), torch.zeros(0, dtype=torch.long), (50, 40))
    untagged = dataclasses.replace(full, tags=[""] * len(full))

    def to_edge(r: Regions) -> EdgeRegions:
        return EdgeRegions(r.boxes.numpy(), r.features.numpy(), r.scores.numpy(), r.labels.numpy(), r.image_size,
                           list(r.tags))

    for batch in ([empty, full], [empty], [untagged, full], [untagged]):
        ours = [to_edge(r) for r in batch]
        assert edge.caption(ours) == model.caption(batch)
        assert edge.answer(ours, QUESTIONS[: len(batch)]) == model.answer(batch, QUESTIONS[: len(batch)])
        np.testing.assert_allclose(edge.verify_proba(ours, ours[::-1], STATEMENTS[: len(batch)]),
                                   model.verify_proba(batch, batch[::-1], STATEMENTS[: len(batch)]), atol=1e-5)
        np.testing.assert_allclose(edge.rank(ours, TEXTS), model.rank(batch, TEXTS).numpy(), atol=1e-4)


def test_vqa_answers_and_scores_match(env, edge):
    _, model, paths = env
    want = model.answer_scores(paths, QUESTIONS, top_k=3)
    got = edge.answer_scores(paths, QUESTIONS, top_k=3)
    assert [[a for a, _ in row] for row in got] == [[a for a, _ in row] for row in want]
    np.testing.assert_allclose([[s for _, s in row] for row in got], [[s for _, s in row] for row in want], atol=1e-5)
    assert edge.answer(paths[0], QUESTIONS) == model.answer(paths[0], QUESTIONS)  # one image, several questions


def test_nlvr2_and_retrieval_match(env, edge):
    _, model, paths = env
    left, right = paths, paths[1:] + paths[:1]
    want = model.verify_proba(left, right, STATEMENTS)
    got = edge.verify_proba(left, right, STATEMENTS)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert edge.verify(left, right, STATEMENTS) == model.verify(left, right, STATEMENTS)
    assert len(set(model.verify(left, right, STATEMENTS))) == 2  # both labels occur: the test has teeth
    assert edge.verify(paths[0], paths[1], STATEMENTS) == model.verify(paths[0], paths[1], STATEMENTS)

    want = model.rank(paths, TEXTS).numpy()
    got = edge.rank(paths, TEXTS)
    assert got.shape == want.shape == (len(paths), len(TEXTS))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (np.argsort(-got, axis=0, kind="stable") == np.argsort(-want, axis=0, kind="stable")).all()
    assert (np.argsort(-got, axis=1, kind="stable") == np.argsort(-want, axis=1, kind="stable")).all()
    assert len({tuple(np.argsort(-want[:, t])) for t in range(len(TEXTS))}) > 1  # rankings differ by text
    for query in filter(None, TEXTS):  # an empty query is refused (test_empty_text_is_refused_by_both_runtimes)
        assert [i for i, _ in edge.retrieve(paths, query, top_k=3)] == [i for i, _ in model.retrieve(paths, query, 3)]
    assert edge.rank(paths, []).shape == (len(paths), 0)


def test_empty_text_is_refused_by_both_runtimes(env, edge):
    _, model, paths = env
    for runtime in (model, edge):
        with pytest.raises(MiniVLMError, match="question 2 is only whitespace"):
            runtime.answer_scores(paths[0], [QUESTIONS[0], "  "])
        with pytest.raises(MiniVLMError, match="the statement is empty"):
            runtime.verify_proba(paths[0], paths[1], "")
        with pytest.raises(MiniVLMError, match="the query is empty"):
            runtime.retrieve(paths, "")


def test_int8_graphs_run(env):
    from minivlm.edge import EdgeMiniVLM

    root, model, paths = env
    q8 = MiniVLM.from_pretrained(root / "model", int8=True, threads=1)
    assert isinstance(q8, EdgeMiniVLM) and q8.int8
    caps = q8.caption(paths)
    assert len(caps) == len(paths) and all(isinstance(c, str) and c for c in caps)
    # int8 weights move the scores a little, not the answers: top-1 agreement and bounds on the change. The
    # largest change depends on the CPU's int8 kernels (0.055 of 20 scores on an AVX2-only EPYC, mean 0.010), so
    # the bounds leave room for that and still catch a broken quantisation (changes of 0.2 and more).
    a8, a32 = q8.answer_scores(paths, QUESTIONS, top_k=len(ANSWERS)), model.answer_scores(paths, QUESTIONS, top_k=len(ANSWERS))
    drifts = [abs(dict(x)[a] - c) for x, y in zip(a8, a32) for a, c in y]
    assert len(drifts) == len(paths) * len(ANSWERS) and max(drifts) <= 0.1 and np.mean(drifts) <= 0.025
    # random weights leave near-ties, which any drift may flip; an answer ahead by 0.1 keeps its place
    clear = [(x[0][0], y[0][0]) for x, y in zip(a8, a32) if y[0][1] - y[1][1] > 0.1]
    assert len(clear) >= 3 and all(a == b for a, b in clear)
    # the detector runs fp32 under int8 too: the same regions as the fp32 graphs, exactly
    fp32 = MiniVLM.from_pretrained(root / "model", threads=1)
    for a, b in zip(q8.regions(paths), fp32.regions(paths)):
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.features, b.features)
    assert [len(r) for r in q8.regions(paths)] == [len(r) for r in model.regions(paths)]
    assert len(q8.verify(paths, paths, STATEMENTS)) == len(paths)
    assert q8.rank(paths, TEXTS).shape == (len(paths), len(TEXTS))


def _nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Two 4-bit values a byte, low nibble first, [n, ...] -> [n, 2 x bytes] as float."""
    packed = packed.reshape(n, -1)
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1).astype(np.float32)


def _unpack_int4(node, values: dict) -> tuple[np.ndarray, np.ndarray]:
    """A MatMulNBits node's weight [K, N] in fp32 and each entry's quantisation step (ONNX Runtime's contrib op:
    B [N, blocks, block / 2] in nibbles; per block one scale and one zero point, the zero points in nibbles too)."""
    attrs = {a.name: a.i for a in node.attribute}
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    blocks = -(-k // block)
    q = _nibbles(values[node.input[1]], n)[:, :k]
    scales = values[node.input[2]].reshape(n, blocks)
    zero = _nibbles(values[node.input[3]], n)[:, :blocks]  # asymmetric: 4-bit zero points are stored
    per_entry = [np.repeat(x, block, axis=1)[:, :k] for x in (scales, zero)]
    return ((q - per_entry[1]) * per_entry[0]).T, np.abs(per_entry[0]).T


def test_int4_step_has_4_bit_weights_and_computes_with_them(env, tmp_path):
    """--int4: the caption step's every weight product (the MLM head's decoder too) in 4-bit blocks, its tables
    shared with the int8 graphs; every other graph is the int8 one."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from minivlm.edge import CachedSteps, EdgeMiniVLM
    from minivlm.export import _gemm_as_matmul, export_model

    root, _, paths = env
    folder = root / "model" / "onnx"
    q4 = MiniVLM.from_pretrained(root / "model", int4=True, threads=1)
    assert isinstance(q4, EdgeMiniVLM) and q4.int4 and q4.int8
    cfg = q4.task("caption")
    assert q4._pick(cfg["step"]) == "caption_step.int4.onnx" and q4._pick(cfg["prefix"]) == "caption_prefix.int8.onnx"
    assert q4._pick(q4.task("vqa")["graph"]) == "vqa.int8.onnx"

    fp32 = onnx.load(str(folder / "caption_step.onnx"), load_external_data=False)
    consts = {t.name for t in fp32.graph.initializer}
    products = sum(n.op_type in ("MatMul", "Gemm") and n.input[1] in consts for n in fp32.graph.node)
    step = onnx.load(str(folder / "caption_step.int4.onnx"), load_external_data=False)
    ops = [n.op_type for n in step.graph.node]
    assert ops.count("MatMulNBits") == products >= 4 * BERT.num_layers + 2 and "Gemm" not in ops
    assert all(dict((a.name, a.i) for a in n.attribute)["bits"] == 4 for n in step.graph.node if n.op_type == "MatMulNBits")
    external = {t.name: {e.key: e.value for e in t.external_data} for t in step.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external and all(x["location"] == "caption_weights.int8.bin" for x in external.values())
    prefix8 = onnx.load(str(folder / "caption_prefix.int8.onnx"), load_external_data=False)
    assert set(external) & {t.name for t in prefix8.graph.initializer}  # the word embeddings, stored once

    # Each 4-bit matrix, unpacked, is its fp32 matrix rounded to its block's step (a block's extremes may land
    # up to a step away: its zero point is rounded too) ...
    full = onnx.load(str(folder / "caption_step.int4.onnx"))
    ref_graph = onnx.load(str(folder / "caption_step.onnx"))
    _gemm_as_matmul(ref_graph)
    weights = {t.name: numpy_helper.to_array(t) for t in ref_graph.graph.initializer}
    by_output = {n.output[0]: n for n in ref_graph.graph.node if n.op_type == "MatMul" and n.input[1] in weights}
    values = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer}
    for node in (n for n in full.graph.node if n.op_type == "MatMulNBits"):
        w, (dq, spacing) = weights[by_output[node.output[0]].input[1]], _unpack_int4(node, values)
        err = np.abs(dq - w)
        assert dq.shape == w.shape and np.all(err <= spacing + 1e-6) and np.mean(err <= spacing / 2 + 1e-6) > 0.9
        weights[by_output[node.output[0]].input[1]] = dq
    # ... and the int4 step (after the int8 prefix) computes with those matrices: against the fp32 step holding
    # them, its logits move as int8's do (its products quantise the activations to 8 bits). Against the fp32
    # weights they move by 4-bit's own error too, which on these random weights is large and not bounded here.
    for t in ref_graph.graph.initializer:
        if t.name in weights and t.dims and len(t.dims) == 2:
            t.CopyFrom(numpy_helper.from_array(weights[t.name], t.name))
    onnx.save(ref_graph, str(tmp_path / "dequantised_step.onnx"))
    ref = EdgeMiniVLM(folder, threads=1)
    ref._sessions[cfg["step"]] = ort.InferenceSession(str(tmp_path / "dequantised_step.onnx"),
                                                      providers=["CPUExecutionProvider"])
    regions = ref.regions(paths[:2])
    last = np.full(2, q4.ids["cls"], dtype=np.int64)
    a, b = CachedSteps(ref, cfg, regions), CachedSteps(q4, cfg, regions)
    for _ in range(3):
        la, lb = a(last), b(last)
        for x, y in zip(la.reshape(2, -1), lb.reshape(2, -1)):
            assert np.abs(x - y).max() < 0.5 * x.std() and np.corrcoef(x, y)[0, 1] > 0.99
        last = la.reshape(2, -1).argmax(-1).astype(np.int64)
    caps = q4.caption(paths)
    assert len(caps) == len(paths) and all(isinstance(c, str) and c for c in caps)

    export_model(root / "model", tmp_path / "q8", int8=True)  # int8 graphs, no int4 step
    export_model(root / "model", tmp_path / "plain")
    for name in ("q8", "plain"):
        with pytest.raises(MiniVLMError, match=r"no int4 caption step.*export MODEL --int4"):
            EdgeMiniVLM(tmp_path / name, int4=True)
    with pytest.raises(MiniVLMError, match="int4 runs exported graphs"):
        MiniVLM.from_pretrained(root / "model", backend="torch", int4=True)


def test_runtime_and_commands_never_import_torch(env):
    root, _, paths = env
    model, onnx, p0, p1 = str(root / "model"), str(root / "model" / "onnx"), str(paths[0]), str(paths[1])
    code = f"""
import sys
from minivlm.edge import EdgeMiniVLM
from minivlm.cli import main
m = EdgeMiniVLM({onnx!r}, threads=1)
assert m.caption([{p0!r}]) and m.answer({p0!r}, "is it red?")
assert main(["edge-caption", {onnx!r}, {p1!r}, "--int8", "--threads", "1"]) == 0
assert main(["caption", {model!r}, {p1!r}, "--bf16"]) == (0 if {cpu_has_bf16()!r} else 1)
assert main(["caption", {model!r}, {p1!r}, "--beam-size", "2"]) == 0
assert main(["caption", {model!r}, {p0!r}, {p1!r}, "--int4"]) == 0
assert main(["nlvr2", {model!r}, {p0!r}, {p1!r}, "a red star", "--json"]) == 0
assert main(["retrieve", {model!r}, "--images", {str(root)!r}, "--query", "a red star", "--int8"]) == 0
assert main(["vqa", {model!r}, {p1!r}, "is it red?", "--json", "--top", "2"]) == 0
bad = [m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision"))]
assert not bad, bad
print("no torch")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("no torch")
    doc = json.loads(res.stdout[res.stdout.rindex("\n[") + 1:res.stdout.rindex("]") + 1])  # the vqa command's
    assert doc[0]["question"] == "is it red?" and len(doc[0]["top"]) == 2


def test_the_split_detector_graphs_give_the_one_graphs_regions(env):
    """`export --bf16` writes the detector again as features (backbone + BiFPN) and head (RPN, NMS, RoIAlign,
    region head) graphs. In fp32, through onnxruntime or OpenVINO, the two give the one graph's regions."""
    import onnxruntime as ort

    from minivlm.edge import EdgeMiniVLM, OpenVINOGraph, letterbox

    root, _, paths = env
    onnx = root / "model" / "onnx"
    edge = EdgeMiniVLM(onnx, threads=1)
    split = edge.det["bf16"]
    assert split["levels"] == ["p2", "p3", "p4", "p5", "p6"]  # strides 4..64
    ort_features = ort.InferenceSession(str(onnx / split["features"]), providers=["CPUExecutionProvider"])
    ov_features = OpenVINOGraph(onnx / split["features"], "f32", threads=1)
    head = edge.session(split["head"])
    assert "canvas" in {i.name for i in head.get_inputs()}  # this region head pools the image's pixels
    for path in paths:
        canvas, hw, _, _ = letterbox(path, edge.det["image_size"])
        hw = np.array(hw, dtype=np.float32)
        want = edge.detect(canvas, hw)
        assert len(want[0]) > 0
        for levels in (ort_features.run(None, {"canvas": canvas}), ov_features(canvas)):
            got = head.run(None, {"canvas": canvas, "image_hw": hw, **dict(zip(split["levels"], levels))})
            np.testing.assert_array_equal(want[2], got[2])
            np.testing.assert_allclose(want[0], got[0], atol=1e-3)
            np.testing.assert_allclose(want[4], got[4], atol=1e-4, rtol=1e-4)


def test_bf16_runs_the_backbone_in_bfloat16_where_the_cpu_has_it(env, tmp_path, capsys):
    from minivlm.cli import main
    from minivlm.edge import EdgeMiniVLM, OpenVINOGraph, letterbox

    root, model, paths = env
    onnx = root / "model" / "onnx"
    features = onnx / EdgeMiniVLM(onnx).det["bf16"]["features"]
    if not cpu_has_bf16():  # e.g. an AVX2-only CPU: one clear line, from the library and the command
        with pytest.raises(MiniVLMError, match="no bfloat16 units"):
            EdgeMiniVLM(onnx, bf16=True)
        assert main(["caption", str(root / "model"), str(paths[0]), "--bf16"]) == 1
        assert "no bfloat16 units" in capsys.readouterr().err
        return
    canvas, _, _, _ = letterbox(paths[0], EdgeMiniVLM(onnx).det["image_size"])
    bf16, f32 = OpenVINOGraph(features, "bf16", 1)(canvas), OpenVINOGraph(features, "f32", 1)(canvas)
    for a, b in zip(bf16, f32):  # bfloat16 keeps 8 bits of mantissa: close, and not the fp32 numbers
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert 0 < rel < 0.05, rel
    fast = MiniVLM.from_pretrained(root / "model", int8=True, bf16=True, threads=1)
    assert isinstance(fast, EdgeMiniVLM) and fast.bf16 and fast.int8
    regions = fast.regions(paths)
    assert all(len(r) > 0 and r.features.shape[1] == TEE_CFG.feature_dim for r in regions)
    caps = fast.caption(regions)
    assert len(caps) == len(paths) and all(isinstance(c, str) and c for c in caps)
    assert len(fast.answer(regions, QUESTIONS)) == len(paths)
    # the head's onnxruntime workers must not spin-wait on the cores OpenVINO's features graph runs on next;
    # the transformers' sessions keep onnxruntime's default
    spin = "session.intra_op.allow_spinning"
    head = fast.session(fast.det["bf16"]["head"]).get_session_options()
    assert head.get_session_config_entry(spin) == "0"
    with pytest.raises(Exception, match="does not have configuration"):
        fast.session(fast.task("caption")["step"]).get_session_options().get_session_config_entry(spin)
    assert main(["caption", str(root / "model"), str(paths[0]), "--bf16", "--int8"]) == 0


def test_bf16_needs_the_split_graphs(env, tmp_path, capsys):
    from minivlm.cli import main
    from minivlm.edge import EdgeMiniVLM
    from minivlm.export import export_model

    export_model(env[0] / "model", tmp_path / "plain")
    with pytest.raises(MiniVLMError, match=r"no split detector graphs.*export MODEL --bf16"):
        EdgeMiniVLM(tmp_path / "plain", bf16=True)
    with pytest.raises(MiniVLMError, match="bf16 runs exported graphs"):
        MiniVLM.from_pretrained(env[0] / "model", backend="torch", bf16=True)
    assert main(["edge-caption", str(tmp_path / "plain"), str(env[2][0]), "--bf16"]) == 1
    err = capsys.readouterr().err
    assert "--bf16" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_stale_graphs_are_refused_or_skipped(env, tmp_path, caplog, capsys):
    from minivlm.backend import choose
    from minivlm.cli import main
    from minivlm.edge import EdgeMiniVLM

    root, model, paths = env
    folder = tmp_path / "model"
    shutil.copytree(root / "model", folder)
    assert choose(folder) == "onnx" and choose(folder, "auto", "cuda") == "torch"
    with pytest.raises(MiniVLMError, match="CPU"):
        choose(folder, "onnx", "cuda")
    assert isinstance(MiniVLM.from_pretrained(folder, backend="torch"), MiniVLM)

    changed = MiniVLM.from_pretrained(folder, backend="torch")
    with torch.no_grad():
        changed.tasks["vqa"].head.net[-1].weight.mul_(-1)  # the model is saved again after the export
    changed.save_pretrained(folder)
    with caplog.at_level(logging.WARNING, logger="minivlm.backend"):
        assert isinstance(MiniVLM.from_pretrained(folder), MiniVLM)  # auto: PyTorch, and why
    assert "stale" in caplog.text and "model.safetensors" in caplog.text
    with pytest.raises(MiniVLMError, match=r"stale.*model\.safetensors changed.*minivlm export"):
        MiniVLM.from_pretrained(folder, backend="onnx")
    assert main(["vqa", str(folder), str(paths[0]), "what?", "--backend", "onnx"]) == 1
    err = capsys.readouterr().err
    assert "stale" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    # --out writes elsewhere; the manifest ties the graphs to the weights, not to a place
    assert main(["export", str(folder), "--out", str(tmp_path / "elsewhere")]) == 0
    assert choose(folder) == "torch"
    shutil.rmtree(folder / "onnx")
    shutil.copytree(tmp_path / "elsewhere", folder / "onnx")
    fresh = MiniVLM.from_pretrained(folder, threads=1)
    assert isinstance(fresh, EdgeMiniVLM)
    assert fresh.answer(paths, QUESTIONS) == changed.answer(paths, QUESTIONS) != model.answer(paths, QUESTIONS)
    with pytest.raises(MiniVLMError, match="no int8 graphs"):
        MiniVLM.from_pretrained(folder, int8=True)

    shutil.rmtree(folder / "onnx")
    caplog.clear()
    assert isinstance(MiniVLM.from_pretrained(folder), MiniVLM) and not caplog.text  # no graphs: PyTorch, quietly
    with pytest.raises(MiniVLMError, match="no ONNX graphs.*minivlm export"):
        MiniVLM.from_pretrained(folder, backend="onnx")
    with pytest.raises(MiniVLMError, match="unknown backend"):
        MiniVLM.from_pretrained(folder, backend="tensorrt")
    with pytest.raises(MiniVLMError, match="int8"):
        MiniVLM.from_pretrained(folder, backend="torch", int8=True)


def test_clear_errors(env, tmp_path, capsys):
    from minivlm.cli import main
    from minivlm.edge import EdgeMiniVLM
    from minivlm.export import export_model

    onnx = env[0] / "model" / "onnx"
    with pytest.raises(DataFormatError, match="ONNX folder not found"):
        EdgeMiniVLM(tmp_path / "nowhere")
    with pytest.raises(DataFormatError, match="edge.json"):
        EdgeMiniVLM(env[0] / "model")  # the model folder, not its onnx/
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in onnx.iterdir():
        if p.name not in ("caption_step.onnx", "edge.json"):
            (broken / p.name).symlink_to(p)
    config = json.loads((onnx / "edge.json").read_text())
    (broken / "edge.json").write_text(json.dumps(config))
    with pytest.raises(DataFormatError, match="caption_step.onnx"):
        EdgeMiniVLM(broken)
    (broken / "edge.json").write_text(json.dumps({**config, "version": 1}))
    with pytest.raises(DataFormatError, match="version 1.*minivlm export"):
        EdgeMiniVLM(broken)
    with pytest.raises(MiniVLMError, match="model folder not found"):
        export_model(tmp_path / "nowhere", tmp_path / "out")
    assert main(["export", str(tmp_path / "nowhere")]) == 1
    assert "model folder not found" in capsys.readouterr().err


def test_a_detector_with_texture_and_box_size_pools_exports_exactly(tmp_path):
    """The demo's region head inputs (pixels, texture-energy maps, the box's spectrum rings, the silhouette, box
    size over the canvas and over the image's short side: neither image is square), its heads reading the RoI
    too, its object class head, and its region features with the detector's decisions appended trace into the
    detector graph and give PyTorch's regions."""
    import onnxruntime as ort

    from minivlm.export import DetectorGraph, _export
    from minivlm.vision.tee import TEE, letterbox, pad_to_canvas

    cfg = dataclasses.replace(TEE_CFG, roi_texture_pool=True, roi_spectrum_pool=True, roi_silhouette=True,
                              roi_box_size=True, roi_box_image_size=True, region_label_code=40.0,
                              attribute_groups=(0, 1), head_reads_pooled=True, attribute_pooled_norm=True,
                              object_class_head=True)
    torch.manual_seed(0)
    detector = TEE(cfg, ["circle", "square", "star"], ["red", "blue"]).eval()
    for p in detector.roi_head.parameters():
        p.data.normal_(0, 0.2) if p.dim() > 1 else None
    norm = detector.roi_head.attribute_head.pooled_norm  # statistics a trained head has, not BatchNorm's 0 / 1
    norm.running_mean.normal_(0, 0.5)
    norm.running_var.uniform_(0.2, 3.0)
    objects = detector.roi_head.object_class.norm
    objects.running_mean.normal_(0, 0.5)
    objects.running_var.uniform_(0.2, 3.0)
    s = cfg.image_size
    _export(DetectorGraph(detector), (torch.randn(1, 3, s, s), torch.tensor([float(s), float(s * 3 // 4)])),
            tmp_path / "detector.onnx", ["canvas", "image_hw"], ["boxes", "scores", "labels", "attributes", "features"], {})
    session = ort.InferenceSession(str(tmp_path / "detector.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for w, h in [(120, 90), (64, 100)]:
        stripes = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)  # noise (no tied scores) ...
        stripes[:, ::4] += 120  # ... with stripes: the texture maps are not constant
        image, _, _ = letterbox(Image.fromarray(stripes), s)
        canvas = pad_to_canvas([image], s)
        with torch.no_grad():
            want = detector.detect(canvas, [tuple(image.shape[1:])])[0]
        got = session.run(None, {"canvas": canvas.numpy(), "image_hw": np.array(image.shape[1:], np.float32)})
        assert len(want["boxes"]) == len(got[0]) > 0 and got[4].shape[1] == cfg.feature_dim == 16 + 3 + 2
        np.testing.assert_array_equal(want["labels"].numpy(), got[2])
        np.testing.assert_allclose(want["boxes"].numpy(), got[0], atol=1e-3)
        np.testing.assert_allclose(want["features"].numpy(), got[4], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("task,pool", [("nlvr2", "region-attention"), ("nlvr2", "region-count"),
                                       ("vqa", "region-count"), ("vqa", "region-attention+null"),
                                       ("vqa", "pick-compare+null"), ("nlvr2", "pick-compare"),
                                       ("vqa", "pick-match+null"), ("nlvr2", "pick-match"),
                                       ("vqa", "pick-relate+null"), ("nlvr2", "pick-relate")])
def test_region_pooling_graphs_match_pytorch(tmp_path, task, pool):
    """The region heads (NLVR2: two sequences per pair; the count head's sum of sigmoids and its answer bins;
    the attention's null slot; pick-compare's word weightings and products; pick-match's count and fits;
    pick-relate's split and box gaps) traced with other batch, token and region counts than the run's, and a
    sequence with fewer regions."""
    import onnxruntime as ort

    from minivlm.export import FUSION_INPUTS, export_fusion
    from minivlm.fusion.inputs import FusionBatch

    torch.manual_seed(0)
    pool, null = pool.removesuffix("+null"), pool.endswith("+null")
    model = build_task_model(task, BERT, len(ANSWERS) if task == "vqa" else None,
                             extra={"pool": pool, "null_region": null}).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3) if p.dim() > 1 or null else None
    if task == "vqa":
        model.set_answers(ANSWERS[:-1] + ["2"])  # a number answer: the count's bins reach its logit
    info = export_fusion(task, model, tmp_path)
    b, t, r = 6, 9, 3
    types = torch.zeros(b, t, dtype=torch.long)
    types[:, 6:] = 1
    text_mask = torch.ones(b, t, dtype=torch.bool)
    text_mask[0, 8] = False
    region_mask = torch.ones(b, r, dtype=torch.bool)
    region_mask[3, 1:] = False
    batch = FusionBatch(torch.randint(1000, 2000, (b, t)), types, torch.arange(t).expand(b, t), text_mask,
                        text_mask.clone(), torch.randn(b, r, BERT.region_dim), torch.rand(b, r, 6), region_mask)
    with torch.no_grad():
        want = model.logits(batch).numpy()
    feed = dict(zip(FUSION_INPUTS, [x.numpy() for x in (batch.input_ids, batch.token_type_ids, batch.position_ids,
                                                          batch.text_mask, batch.region_feats, batch.region_boxes,
                                                          batch.region_mask)]))
    got = ort.InferenceSession(str(tmp_path / info["graph"]), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    if null:  # int8 too: onnxruntime's quantiser once mangled the slot's score (a MatMul with a 1-d weight)
        from minivlm.export import int8_name, quantize

        quantize(tmp_path / info["graph"], tmp_path / int8_name(info["graph"]))
        q8 = ort.InferenceSession(str(tmp_path / int8_name(info["graph"])), providers=["CPUExecutionProvider"])
        assert q8.run(None, feed)[0].shape == want.shape
