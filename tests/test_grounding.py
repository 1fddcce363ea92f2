"""Grounding: oracle and blind region stores, and a tiny fusion model that must learn VQA from oracle regions
(answers that the question alone cannot give), with the answer head starting at the prior."""

from __future__ import annotations

import pytest
import torch

from minivlm.config import BertConfig
from minivlm.data.feature_store import FeatureStore
from minivlm.data.oracle import write_blind_store, write_oracle_store
from minivlm.data.world import World
from minivlm.tasks.vqa import VQACollator, VQADataset, VQAModel, build_answer_vocab, make_examples, vqa_loss
from minivlm.text.tokenizer import get_tokenizer

# 12 classes + 17 attributes fit a 32-wide oracle region.
TINY = BertConfig("tiny", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=2, dropout=0.0,
                  region_dim=32, max_regions=8, max_text_len=16, max_tag_len=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from minivlm.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("grounding")
    generate_world(root / "world", images=40, seed=1, nlvr2_pairs=0, workers=1, questions_per_image=8)
    write_oracle_store(root / "world", root / "oracle", region_dim=TINY.region_dim)
    write_blind_store(root / "world", root / "blind", region_dim=TINY.region_dim)
    return root


def test_oracle_regions_are_the_ground_truth(world):
    w, store = World(world / "world"), FeatureStore(world / "oracle")
    inst = w.instances("train")
    classes, n_cls = inst.category_index(), len(inst.class_names())
    attrs = inst.attribute_index()
    for iid, anns in list(inst.annotations.items())[:10]:
        r = store[iid]
        assert len(r) == len(anns) and r.features.shape[1] == TINY.region_dim
        for i, a in enumerate(anns):
            x, y, bw, bh = a.bbox
            assert r.boxes[i].tolist() == pytest.approx([x, y, x + bw, y + bh], abs=1e-3)
            hot = set(torch.nonzero(r.features[i]).flatten().tolist())
            assert hot == {classes[a.category_id], *(n_cls + attrs[t] for t in a.attribute_ids)}
            assert r.tags[i] == inst.class_names()[classes[a.category_id]]
    blind = FeatureStore(world / "blind")
    assert len(blind) == len(store) and all(len(blind[k]) == 0 for k in blind.keys()[:5])


def ambiguous_questions(world) -> list:
    """Training questions whose text has more than one answer in the set ("what color is the star?"): no model
    of the question alone can fit them all; a model that reads the regions can."""
    questions = World(world / "world").vqa("train")
    by_text: dict[str, set[str]] = {}
    for q in questions:
        by_text.setdefault(q.question, set()).add(q.multiple_choice_answer)
    return [q for q in questions if len(by_text[q.question]) > 1]


def _fit(world, store_name: str, steps: int, bias_init: bool = True) -> tuple[float, dict[int, float]]:
    """(initial loss, training VQA score per question after `steps` full-batch steps) of the tiny model on
    the ambiguous training questions."""
    store, tok = FeatureStore(world / store_name), get_tokenizer()
    questions = ambiguous_questions(world)
    answers = build_answer_vocab(questions, 3129)
    examples, _ = make_examples(questions, store, answers, drop_unanswerable=True)
    batch = VQACollator(tok, TINY, len(answers))([VQADataset(examples, store)[i] for i in range(len(examples))])
    torch.manual_seed(0)
    model = VQAModel(TINY, len(answers))
    if bias_init:
        model.init_answer_bias([e.targets for e in examples])
    first = vqa_loss(model.logits(batch.inputs), batch.targets).item()
    # Full batch: memorising a few hundred questions from minibatches of 32 took ~2,000 noisy steps.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        scores = batch.targets.gather(1, model.logits(batch.inputs).argmax(1, keepdim=True))[:, 0]
    return first, dict(zip(batch.question_ids, scores.tolist()))


def test_answer_head_starts_at_the_prior(world):
    with_prior, _ = _fit(world, "oracle", 0)
    zero_bias, _ = _fit(world, "oracle", 0, bias_init=False)
    assert with_prior < 0.25 * zero_bias  # 0.69 x answers at a zero bias


def test_tiny_fusion_model_learns_from_oracle_regions_what_the_question_cannot_say(world):
    _, oracle = _fit(world, "oracle", 200)
    _, blind = _fit(world, "blind", 200)
    assert len(oracle) >= 40
    acc = lambda scores: sum(scores.values()) / len(scores)  # noqa: E731
    assert acc(oracle) >= 0.9 and acc(oracle) >= acc(blind) + 0.25, (acc(oracle), acc(blind))


def test_the_benchmark_reports_vqa_per_type_with_the_demos_head(world, tmp_path):
    """`benchmarks/grounding.py`'s VQA table: each setting's column is its model's own test accuracy per type,
    beside the per-type prior and the ceiling, and every setting is trained with the demo's head (its pool and
    null slot), so the oracle row says what the demo's recipe does with perfect regions."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import grounding

    out = tmp_path / "out"
    assert grounding.main(["--data", str(world / "world"), "--settings", "oracle,blind", "--epochs", "1",
                           "--curriculum-epochs", "0", "--out", str(out)]) == 0
    table = json.loads((out / "grounding.json").read_text())["vqa"]
    assert table["overall"]["ceiling"] == pytest.approx(100.0)  # the generator's answer has >= 6 of 10 votes
    for setting in ("oracle", "blind"):
        metrics = json.loads((out / setting / "metrics.json").read_text())["eval"]["test"]
        assert table["overall"][setting] == pytest.approx(metrics["accuracy"])
        assert {t: r[setting] for t, r in table.items() if t != "overall"} == pytest.approx(
            metrics["per_question_type"])
        head = json.loads((out / setting / "config.json").read_text())["config"]
        assert (head["pool"], head["null_region"]) == (grounding.DEMO.vqa_pool, grounding.DEMO.region_null)
    assert table["overall"]["per_question_type"] == pytest.approx(
        json.loads((out / "oracle" / "metrics.json").read_text())["eval"]["test"]["baselines"]
        ["baseline_per_question_type"])
    # The three kinds of check split the "is the" questions: their sizes add up and their accuracies average to it.
    checks = json.loads((out / "grounding.json").read_text())["vqa_checks"]
    n = [checks[k]["n"] for k in grounding.CHECKS]
    w = World(world / "world")
    assert sum(n) == sum(q.question_type == "is the" for q in w.vqa("test")) > 0
    for column in ("ceiling", "per_question_type", "oracle", "blind"):
        mean = sum(checks[k][column] * checks[k]["n"] for k in grounding.CHECKS) / sum(n)
        assert mean == pytest.approx(table["is the"][column], abs=0.01)


def test_check_kind_reads_the_generators_own_family_of_each_yes_no_check():
    import sys
    from pathlib import Path

    import numpy as np

    from minivlm.data.synthetic import render_scene
    from minivlm.data.synthetic_text import questions

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from grounding import check_kind

    seen = set()
    for i in range(40):
        _, scene, _ = render_scene(np.random.default_rng(i))
        for q in questions(scene, np.random.default_rng(1000 + i), 20):
            if q.question_type == "is the":
                assert check_kind(q.question) == q.family, q.question
                seen.add(q.family)
    assert seen == {"spatial", "texture", "size"}


def test_the_benchmark_reports_nlvr2_on_oracle_and_no_regions(tmp_path):
    """`benchmarks/grounding.py --nlvr2 --no-vqa`: NLVR2 fine-tuned on the pairs' oracle and blind regions, scored per
    kind of statement beside the kind prior; every test statement counted once."""
    import json
    import sys
    from pathlib import Path

    from minivlm.data.synthetic import generate_world

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import grounding
    import nlvr2_symbolic as sym

    generate_world(tmp_path / "world", images=12, seed=2, nlvr2_pairs=16, workers=1, nlvr2_statements=4)
    out = tmp_path / "out"
    assert grounding.main(["--data", str(tmp_path / "world"), "--nlvr2", "--no-vqa", "--nlvr2-epochs", "1",
                           "--settings", "oracle,blind", "--out", str(out)]) == 0
    blind = FeatureStore(out / "blind_nlvr2_store")
    assert len(blind) == len(FeatureStore(out / "oracle_nlvr2_store")) == 32
    assert all(len(blind[k]) == 0 for k in blind.keys())
    table = json.loads((out / "grounding_nlvr2.json").read_text())["nlvr2"]
    world = World(tmp_path / "world")
    test = world.nlvr2("test1")
    assert table["all"]["n"] == len(test) == sum(r["n"] for k, r in table.items() if k != "all")
    majority = sym.kind_majorities(world.nlvr2("train"))
    assert table["all"]["kind_prior"] == pytest.approx(
        100.0 * sum(majority.get(sym.kind_of(e.sentence), True) == e.label for e in test) / len(test))
    for setting in ("oracle", "blind"):
        predictions = {r["identifier"]: r["prediction"]
                       for r in json.loads((out / f"nlvr2_{setting}" / "results_test1.json").read_text())}
        assert table["all"][setting] == pytest.approx(
            100.0 * sum(predictions[e.identifier] == e.label for e in test) / len(test))


def test_a_world_without_the_nlvr2_objects_gets_a_one_line_error(tmp_path):
    """Worlds made before the generator wrote nlvr2/annotations/: a clear error, from Python and the command."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from minivlm.data.synthetic import generate_world
    from minivlm.errors import MiniVLMError

    generate_world(tmp_path / "world", images=6, seed=4, nlvr2_pairs=4, workers=1)
    shutil.rmtree(tmp_path / "world" / "nlvr2" / "annotations")
    with pytest.raises(MiniVLMError, match="make the world again"):
        write_oracle_store(tmp_path / "world", tmp_path / "o", nlvr2=True)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "grounding.py"
    res = subprocess.run([sys.executable, str(script), "--data", str(tmp_path / "world"), "--nlvr2", "--no-vqa",
                          "--settings", "oracle", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0 and res.stderr.startswith("error:") and "make the world again" in res.stderr
    assert "Traceback" not in res.stderr
