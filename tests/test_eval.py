"""Evaluation: caption metrics (pycocoevalcap), CIDEr-D for SCST, official VQA accuracy, Recall@K, NLVR2,
and the `minivlm evaluate` command. Java runs are few: one PTB comparison, one METEOR, one full scoring."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from minivlm.cli import main as cli_main
from minivlm.errors import DataFormatError
from minivlm.eval import caption_metrics as cm
from minivlm.eval.caption_metrics import CiderD, JavaError, score_captions, simple_tokenize
from minivlm.eval.nlvr2 import nlvr2_accuracy
from minivlm.eval.retrieval import recall_at_k, retrieval_metrics, subset_splits
from minivlm.eval.vqa_eval import answer_accuracy, normalize_answer, process_punctuation, vqa_accuracy

REFS = {
    1: ["a dog runs across the green grass", "a brown dog running in a field", "the dog is running outside"],
    2: ["a cat sits on a red mat", "the cat is lying on the mat", "a small cat on a rug"],
    3: ["two people ride bikes down the street", "cyclists on a city road", "two men riding bicycles"],
}


# ---------------------------------------------------------------- captions

def _pycoco(refs, res):
    gts = {i: refs[i] for i in res}
    hyp = {i: [c] for i, c in res.items()}
    return Bleu(4).compute_score(gts, hyp, verbose=0)[0], Cider().compute_score(gts, hyp)[0]


def test_bleu_cider_match_pycocoevalcap_and_order_good_over_bad():
    res = {1: "a dog running on the grass", 2: "a cat lying on a mat", 3: "people riding bikes on a road"}
    m = score_captions(res, REFS, tokenizer="simple", meteor=False, spice=False)
    bleu, cider = _pycoco(REFS, res)
    for n in range(4):
        assert m[f"Bleu_{n + 1}"] == pytest.approx(bleu[n], abs=1e-12)
    assert m["CIDEr"] == pytest.approx(cider, abs=1e-12)
    assert m["METEOR"] is None and m["SPICE"] is None  # not requested: no number is made up

    same = score_captions({i: REFS[i][0] for i in REFS}, REFS, tokenizer="simple", meteor=False, spice=False)
    other = score_captions({1: "an orange clock tower at noon", 2: "pizza with cheese slices",
                            3: "snowy mountain under blue sky"}, REFS, tokenizer="simple", meteor=False, spice=False)
    assert same["Bleu_4"] == pytest.approx(1.0) and same["CIDEr"] > 2.0 and same["ROUGE_L"] == pytest.approx(1.0)
    assert other["Bleu_4"] < 1e-3 and other["CIDEr"] == 0.0 and other["ROUGE_L"] < 0.2
    assert m["CIDEr"] < same["CIDEr"] and m["Bleu_1"] > other["Bleu_1"]


def test_caption_result_validation():
    with pytest.raises(ValueError, match="no reference"):
        score_captions({99: "a dog"}, REFS, tokenizer="simple", meteor=False, spice=False)
    with pytest.raises(ValueError, match="twice"):
        score_captions([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}], REFS,
                       tokenizer="simple", meteor=False, spice=False)


def test_ptb_tokenizer_matches_pycocoevalcap():
    caps = {1: ["A man's dog, running.", 'Two "cats" (on) a mat!'], 2: ["Three  people -- on bikes..."]}
    ours = cm.ptb_tokenize(caps)
    official = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in caps.items()})
    assert ours == official
    # A carriage return inside a caption must not shift the captions after it (the official wrapper's does).
    assert cm.ptb_tokenize({1: ["a dog\r\nruns"], 2: ["A cat."]}) == {1: ["a dog runs"], 2: ["a cat"]}


def test_java_metrics_meteor_rouge_and_spice_reported_unavailable(tmp_path):
    res = {1: REFS[1][0], 2: "pizza with cheese slices"}
    total, per = cm.meteor_score({i: REFS[i] for i in res}, {i: [c] for i, c in res.items()})
    assert per[0] > 0.9 and per[1] < 0.2 and 0 < total < 1

    m = score_captions({1: "A dog running on the grass.", 2: "A cat lying on a mat."}, REFS)
    assert 0 < m["METEOR"] < 1 and 0 < m["ROUGE_L"] <= 1 and m["CIDEr"] > 0
    if cm.spice_unavailable_reason() is None:
        assert isinstance(m["SPICE"], float)
    else:
        assert m["SPICE"] is None and "stanford-corenlp-3.6.0" in m["SPICE_unavailable"]
    # A SPICE folder without the CoreNLP jars: reported, with what to put where, never a number.
    (tmp_path / cm.SPICE_JAR).write_bytes(b"")
    reason = cm.spice_unavailable_reason(tmp_path)
    assert "stanford-corenlp-3.6.0.jar" in reason and "stanford-corenlp-3.6.0-models.jar" in reason
    assert str(tmp_path / "lib") in reason
    m2 = score_captions({1: "a dog"}, REFS, tokenizer="simple", meteor=False, spice=True, spice_dir=tmp_path)
    assert m2["SPICE"] is None and "stanford-corenlp-3.6.0.jar" in m2["SPICE_unavailable"]


def test_java_failures_are_clear_errors(monkeypatch, tmp_path):
    gts, res = {1: ["a dog runs"]}, {1: ["a dog"]}
    hang = tmp_path / "java"  # a "java" that never answers: the watchdog must fire, however fast the machine
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(0o755)
    with monkeypatch.context() as m:
        m.setattr(cm, "_java", lambda: str(hang))
        with pytest.raises(JavaError, match="did not finish"):
            cm.meteor_score(gts, res, timeout=0.5)
    monkeypatch.setattr(cm, "METEOR_JAR", "no-such-meteor.jar")
    with pytest.raises(JavaError, match="METEOR"):
        cm.meteor_score(gts, res)
    m = score_captions({1: "a dog"}, REFS, tokenizer="simple", spice=False)
    assert m["METEOR"] is None and "METEOR" in m["METEOR_unavailable"] and m["Bleu_1"] > 0
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    with pytest.raises(JavaError, match="not on PATH"):
        cm.ptb_tokenize({1: ["a dog"]})


# ---------------------------------------------------------------- CIDEr-D for SCST

def test_cider_d_agrees_with_pycocoevalcap_cider():
    rng = random.Random(0)
    vocab = "a man dog cat on the mat grass field running sitting red blue table with of two in".split()
    refs = {i: [" ".join(rng.choices(vocab, k=rng.randint(4, 11))) for _ in range(5)] for i in range(30)}
    cands = {i: " ".join(rng.choices(vocab, k=rng.randint(4, 11))) for i in refs}
    cands[3] = refs[3][0]
    official_mean, official = Cider().compute_score(refs, {i: [c] for i, c in cands.items()})
    scorer = CiderD(refs)
    mean, per = scorer.score(cands)
    assert mean == pytest.approx(official_mean, rel=1e-12)
    np.testing.assert_allclose(per, official, rtol=1e-12, atol=1e-12)
    # Several samples per image (SCST): pairs, scored in the given order, idf from the corpus, not the batch.
    _, again = scorer.score([(3, cands[3]), (5, cands[5]), (3, "zebra zebra")])
    assert again[0] == pytest.approx(official[3]) and again[1] == pytest.approx(official[5])
    assert again[2] == 0.0 and again[0] > again[1]
    # Simple tokenisation: case and punctuation do not matter.
    assert scorer.score({3: refs[3][0].upper() + "!"})[1][0] == pytest.approx(official[3])
    with pytest.raises(KeyError):
        scorer.score({999: "a dog"})


def test_simple_tokenize():
    assert simple_tokenize("A Man's dog, running!  ") == "a man's dog running"


# ---------------------------------------------------------------- VQA

def test_vqa_normalisation_rules():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("the dog.") == "dog"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer(" An Apple\n") == "apple"
    assert process_punctuation("black/white") == "black white"
    assert process_punctuation("1,000") == "1000"  # a digit,digit comma: marks are deleted, not spaced
    assert process_punctuation("2.5") == "2.5" and process_punctuation("yes.") == "yes"


def test_vqa_accuracy_hand_cases():
    # 2 of 10 humans said "dog": leaving out one of those 2 leaves 1 match (1/3), the 8 other subsets
    # keep 2 matches (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert answer_accuracy("dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)
    # "yes" x3: 3 subsets keep 2 matches (2/3), 7 keep 3 (1): (3 * 2/3 + 7) / 10 = 0.9.
    assert answer_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    # x4: every subset keeps >= 3 matches.
    assert answer_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    assert answer_accuracy("Two", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    assert answer_accuracy("the dog.", ["dog"] * 5 + ["puppy"] * 5) == pytest.approx(1.0)
    assert answer_accuracy("dont", ["don't"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    assert answer_accuracy("Yes.", ["yes"] * 10) == pytest.approx(1.0)  # unanimous humans
    assert answer_accuracy("one", ["2"] * 10) == 0.0
    # Human answers get the punctuation step when they disagree: "black/white" matches "black white".
    assert answer_accuracy("black white", ["black/white"] * 3 + ["gray"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_overall_and_per_type():
    qs = [
        {"question_id": 1, "question_type": "how many", "answer_type": "number", "answers": ["2"] * 10},
        {"question_id": 2, "question_type": "what is", "answer_type": "other",
         "answers": ["dog"] * 2 + ["cat"] * 8},
        {"question_id": 3, "question_type": "is the", "answer_type": "yes/no", "answers": ["yes"] * 3 + ["no"] * 7},
    ]
    m = vqa_accuracy([{"question_id": 1, "answer": "two"}, {"question_id": 2, "answer": "dog"},
                      {"question_id": 3, "answer": "yes"}], qs)
    assert m["overall"] == 83.33  # (1.0 + 0.6 + 0.9) / 3
    assert m["perAnswerType"] == {"number": 100.0, "other": 60.0, "yes/no": 90.0}
    assert m["perQuestionType"]["what is"] == 60.0 and m["per_question"][3] == 90.0
    with pytest.raises(ValueError, match="no answer"):
        vqa_accuracy([{"question_id": 1, "answer": "2"}], qs)
    with pytest.raises(ValueError, match="not among"):
        vqa_accuracy({1: "2", 2: "a", 3: "b", 4: "c"}, qs)


# ---------------------------------------------------------------- retrieval

def test_recall_at_k_hand_made_ranks():
    t2i = [0, 0, 1, 1, 2, 2]
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3, 0.0],   # image 0: its best caption is first
                           [0.7, 0.6, 0.5, 0.4, 0.1, 0.0],   # image 1: two other captions above its best
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])  # image 2: first
    r = recall_at_k(scores, t2i, ks=(1, 2, 3))
    assert r["TR@1"] == pytest.approx(200 / 3) and r["TR@2"] == pytest.approx(200 / 3) and r["TR@3"] == 100
    # Text ranks of their image: t0 0, t1 2 (0.6 above, 0.1 tied), t2 1, t3 0, t4 0, t5 0.
    assert r["IR@1"] == pytest.approx(400 / 6) and r["IR@2"] == pytest.approx(500 / 6) and r["IR@3"] == 100
    assert r["rsum"] == pytest.approx(sum(v for k, v in r.items() if k != "rsum"))
    flat = recall_at_k(torch.ones(3, 6), t2i, ks=(1,))
    assert flat["TR@1"] == 0 and flat["IR@1"] == 0  # ties give no credit


def test_recall_at_k_matches_sorting_reference():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 14, generator=g)
    t2i = [i // 2 for i in range(14)]
    r = recall_at_k(scores, t2i, ks=(1, 5))
    tr = [min(scores[i].argsort(descending=True).tolist().index(t) for t in range(14) if t2i[t] == i)
          for i in range(7)]
    ir = [scores[:, t].argsort(descending=True).tolist().index(t2i[t]) for t in range(14)]
    for k in (1, 5):
        assert r[f"TR@{k}"] == pytest.approx(100 * np.mean([x < k for x in tr]))
        assert r[f"IR@{k}"] == pytest.approx(100 * np.mean([x < k for x in ir]))


def test_subset_splits_and_fold_average():
    folds = subset_splits(5000)
    assert len(folds) == 5 and all(len(f) == 1000 for f in folds) and folds[4][-1] == 4999
    assert [len(f) for f in subset_splits(53)] == [10] * 5
    # Each image's own caption scores 1, but a caption of the other half scores 2: wrong on the full set,
    # right inside each fold of 5.
    scores = torch.eye(10)
    for i in range(10):
        scores[i, (i + 5) % 10] = 2.0
    m = retrieval_metrics(scores, list(range(10)), fold_size=5)
    assert m["full"]["TR@1"] == 0 and m["folds"]["TR@1"] == 100 and m["folds"]["IR@1"] == 100
    assert (m["fold_size"], m["n_folds"]) == (5, 2)


# ---------------------------------------------------------------- NLVR2

def test_nlvr2_accuracy_and_consistency():
    examples = [{"identifier": "dev-1-0-0", "sentence": "s0", "label": "True"},
                {"identifier": "dev-1-1-0", "sentence": "s0", "label": "False"},
                {"identifier": "dev-1-0-1", "sentence": "s1", "label": "True"},
                {"identifier": "dev-2-0-0", "sentence": "s2", "label": False}]
    preds = {"dev-1-0-0": True, "dev-1-1-0": True, "dev-1-0-1": True, "dev-2-0-0": False}
    m = nlvr2_accuracy(preds, examples)
    assert m["accuracy"] == 75.0
    assert m["n_sentences"] == 3 and m["consistency"] == pytest.approx(200 / 3)  # sentence dev-1-?-0 has a miss
    with pytest.raises(ValueError, match="no prediction"):
        nlvr2_accuracy({"dev-1-0-0": True}, examples)


# ---------------------------------------------------------------- the command

def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_evaluate_command_all_tasks(tmp_path, capsys):
    caps = _write(tmp_path / "captions.json", {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 10, "height": 10} for i in REFS],
        "annotations": [{"id": 10 * i + j, "image_id": i, "caption": c} for i in REFS for j, c in enumerate(REFS[i])]})
    res = _write(tmp_path / "res.json", [{"image_id": 1, "caption": "a dog running"},
                                         {"image_id": 2, "caption": "a cat on a mat"}])
    out = tmp_path / "m.json"
    assert cli_main(["evaluate", "--task", "caption", "--results", res, "--references", caps, "--tokenizer",
                     "simple", "--no-meteor", "--no-spice", "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "CIDEr" in shown and "SPICE unavailable" in shown
    assert json.loads(out.read_text())["Bleu_1"] > 0.5

    qs = _write(tmp_path / "q.json", {"questions": [{"image_id": 5, "question": "How many?", "question_id": 50}]})
    anns = _write(tmp_path / "a.json", {"annotations": [{
        "question_id": 50, "image_id": 5, "question_type": "how many", "answer_type": "number",
        "multiple_choice_answer": "2",
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                    for j, a in enumerate(["2"] * 3 + ["3"] * 7)]}]})
    vres = _write(tmp_path / "vqa_res.json", [{"question_id": 50, "answer": "two"}])
    assert cli_main(["evaluate", "--task", "vqa", "--results", vres, "--references", qs, "--annotations", anns,
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"] == 90.0

    rres = _write(tmp_path / "ret.json", {"scores": torch.eye(10).tolist(), "text_to_image": list(range(10))})
    assert cli_main(["evaluate", "--task", "retrieval", "--results", rres, "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["full"]["TR@1"] == 100 and m["n_folds"] == 5 and m["fold_size"] == 2

    nl = _write(tmp_path / "dev.json", "\n".join(json.dumps(
        {"identifier": f"dev-1-{p}-0", "sentence": "s", "label": lab, "left_url": "", "right_url": ""})
        for p, lab in enumerate(["True", "False"])))
    nres = _write(tmp_path / "nl_res.json", [{"identifier": "dev-1-0-0", "prediction": True},
                                             {"identifier": "dev-1-1-0", "prediction": True}])
    assert cli_main(["evaluate", "--task", "nlvr2", "--results", nres, "--references", nl]) == 0
    shown = capsys.readouterr().out
    assert "accuracy" in shown and "50.00" in shown and "consistency" in shown


def test_malformed_results_name_file_and_field(tmp_path, capsys):
    from minivlm.eval.caption_metrics import read_caption_results
    from minivlm.eval.nlvr2 import read_nlvr2_results
    from minivlm.eval.retrieval import read_retrieval_results
    from minivlm.eval.vqa_eval import read_vqa_results

    bad = _write(tmp_path / "bad.json", [{"image_id": 1}])
    with pytest.raises(DataFormatError, match=r"bad\.json: \[0\]\.caption: missing"):
        read_caption_results(bad)
    with pytest.raises(DataFormatError, match=r"\[0\]\.question_id"):
        read_vqa_results(_write(tmp_path / "v.json", [{"answer": "yes"}]))
    with pytest.raises(DataFormatError, match=r"scores\[1\]"):
        read_retrieval_results(_write(tmp_path / "r.json", {"scores": [[1, 2], [3]], "text_to_image": [0, 1]}))
    with pytest.raises(DataFormatError, match="text_to_image"):
        read_retrieval_results(_write(tmp_path / "r2.json", {"scores": [[1, 2], [3, 4]], "text_to_image": [0, 5]}))
    with pytest.raises(DataFormatError, match=r"\[0\]\.prediction"):
        read_nlvr2_results(_write(tmp_path / "n.json", [{"identifier": "dev-1-0-0", "prediction": "maybe"}]))
    with pytest.raises(DataFormatError, match="not valid JSON"):
        read_caption_results(_write(tmp_path / "broken.json", "[{"))
    caps = _write(tmp_path / "caps.json", {"images": [{"id": 1, "file_name": "1.jpg", "width": 1, "height": 1}],
                                           "annotations": [{"id": 1, "image_id": 1, "caption": "a dog"}]})
    assert cli_main(["evaluate", "--task", "caption", "--results", bad, "--references", caps]) == 1
    err = capsys.readouterr().err
    assert "bad.json" in err and "caption" in err and "Traceback" not in err


def test_caption_grounding_checks_each_mention_against_the_images_objects(tmp_path):
    """Class and attribute words of a caption against the image's objects: synonyms and plurals read as their
    class, attribute words right before the noun only, the references of a generated world all right."""
    from minivlm.data.synthetic import generate_world
    from minivlm.data.world import World
    from minivlm.eval.caption_grounding import caption_grounding, image_objects, mentions, rotated, vocabulary

    generate_world(tmp_path / "w", images=12, seed=0, nlvr2_pairs=0, workers=1)
    world = World(tmp_path / "w")
    inst = world.instances("train")
    vocab = vocabulary(inst)
    assert mentions("A large striped pink disc and two plus signs on a striped background.", vocab) == [
        ("circle", {"texture": "striped", "colour": "pink", "size": "large"}), ("cross", {})]
    assert mentions("Five shapes in four different colors.", vocab) == []
    refs = world.caption_references("train")
    objects = image_objects(inst)
    truth = caption_grounding({k: " . ".join(v) for k, v in refs.items()}, objects, vocab)
    assert truth["mentions"] > 20 and truth["class_precision"] == truth["colour_precision"] == 100.0
    image = next(iter(objects))
    cls, attrs = objects[image][0]
    colour = next(a for a in attrs if a in {"red", "orange", "yellow", "green", "blue", "purple", "pink", "white",
                                            "black"})
    wrong = next(c for c in ("red", "blue") if not any(c in a for k, a in objects[image] if k == cls))
    one = caption_grounding({image: f"a {colour} {cls} and a {wrong} {cls}."}, objects, vocab)
    assert one == {"mentions": 2, "class_precision": 100.0, "colour_mentions": 2, "colour_precision": 50.0}
    assert rotated({1: "a", 2: "b", 3: "c"}) == {1: "b", 2: "c", 3: "a"}
