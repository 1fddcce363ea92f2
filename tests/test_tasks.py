"""Fine-tuning tasks: VQA targets and loss, NLVR2 pairing, retrieval negatives and batched scoring, tiny
overfits that must beat chance, and the `finetune` command on a small generated world."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from minivlm.config import BertConfig
from minivlm.data.readers import VQAQuestion
from minivlm.fusion.heads import PickCompare, RegionAttention, box_gaps
from minivlm.regions import Regions
from minivlm.tasks.nlvr2 import (NLVR2_POOLS, NLVR2Collator, NLVR2Dataset, NLVR2Model, NLVR2Pair,
                                 mirror_statement)
from minivlm.tasks.retrieval import (MISMATCHED, RetrievalCollator, RetrievalDataset, RetrievalModel, _norm,
                                     chance_recall, score_all_pairs, score_pairs)
from minivlm.tasks.vqa import (VQACollator, VQAExample, VQAModel, answer_numbers, baseline_results,
                               build_answer_vocab, count_targets, soft_targets, target_tensor, vqa_loss)
from minivlm.text.tokenizer import get_tokenizer

TINY = BertConfig("tiny", num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2, vocab_size=30522,
                  dropout=0.0, region_dim=16, max_regions=5, max_text_len=12, max_tag_len=6)
TAGS = ["circle", "square", "star", "heart", "ring", "cross"]


def regions(seed: int, k: int = 4, dim: int = TINY.region_dim, tags: list[str] | None = None) -> Regions:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * 50
    labels = torch.randint(len(TAGS), (k,), generator=g)
    return Regions(boxes=torch.cat([xy, xy + 10 + torch.rand(k, 2, generator=g) * 40], 1),
                   features=torch.randn(k, dim, generator=g), scores=torch.rand(k, generator=g), labels=labels,
                   image_size=(100, 100), tags=tags if tags is not None else [TAGS[i] for i in labels.tolist()])


def store_regions(seed: int, names: list[str], label: int) -> Regions:
    r = regions(seed)
    r.labels = torch.full((len(r),), label, dtype=torch.long)
    r.tags = [names[label]] * len(r)
    return r


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()



def q(qid: int, answers: list[str], qtype: str = "what") -> VQAQuestion:
    return VQAQuestion(qid, qid, "what is it?", qtype, "other", answers)


# ---------------------------------------------------------------------------------------------- VQA


def test_soft_targets_are_min_one_of_humans_over_three():
    index = {"yes": 0, "no": 1, "2": 2}
    t = soft_targets(["yes", "yes", "no", "no", "no", "no", "two", "maybe", "no", "no"], index)
    assert t == {0: pytest.approx(2 / 3), 1: 1.0, 2: pytest.approx(1 / 3)}  # "two" normalised to "2"
    assert 3 not in t and soft_targets(["maybe"] * 10, index) == {}
    dense = target_tensor([t, {}], 4)
    assert dense.shape == (2, 4) and dense[0].tolist() == pytest.approx([2 / 3, 1.0, 1 / 3, 0.0]) and dense[1].sum() == 0


def test_answer_vocab_most_frequent_capped_by_data():
    qs = [q(1, ["yes"] * 6 + ["no"] * 4), q(2, ["red"] * 5 + ["blue"] * 5), q(3, ["Two"] * 3 + ["2"] * 7)]
    assert build_answer_vocab(qs, 2) == ["2", "yes"]  # "Two" and "2" count as one answer after normalisation
    full = build_answer_vocab(qs, 3129)  # the paper's size, capped by the 5 distinct answers the data has
    assert full == ["2", "yes", "blue", "red", "no"]  # ties broken alphabetically: the same set every run


def test_vqa_loss_is_bce_summed_over_answers():
    logits, targets = torch.randn(3, 7), torch.rand(3, 7)
    manual = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).sum(1).mean()
    assert torch.allclose(vqa_loss(logits, targets), manual, atol=1e-5)


def test_prior_baselines_answer_the_most_frequent_answers():
    train = [q(1, ["yes"] * 10, "is"), q(2, ["yes"] * 10, "is"), q(3, ["red"] * 10, "what color")]
    test = [q(4, ["red"] * 10, "what color"), q(5, ["no"] * 10, "is"), q(6, ["x"] * 10, "new type")]
    base = baseline_results(train, test)
    assert [r["answer"] for r in base["most_frequent"]] == ["yes", "yes", "yes"]
    assert [r["answer"] for r in base["per_question_type"]] == ["red", "yes", "yes"]


# ---------------------------------------------------------------------------------------------- NLVR2


def test_nlvr2_mirror_swaps_the_images_flips_their_boxes_and_swaps_the_words():
    """The pair seen in a mirror keeps its statement's truth: images swapped, each flipped, left <-> right."""
    assert mirror_statement("In the left image, a star is right of a ring.") == "In the right image, a star is left of a ring."
    assert mirror_statement("The Right image; LEFT; the leftmost star; bright") == "The Left image; RIGHT; the rightmost star; bright"
    a, b = regions(1), regions(2, k=3)
    flipped = a.mirrored()
    w = a.image_size[0]
    assert torch.equal(flipped.boxes[:, 0], w - a.boxes[:, 2]) and torch.equal(flipped.boxes[:, 2], w - a.boxes[:, 0])
    assert torch.equal(flipped.boxes[:, 1::2], a.boxes[:, 1::2]) and torch.equal(flipped.features, a.features)
    assert torch.allclose(flipped.mirrored().boxes, a.boxes)

    pair = NLVR2Pair("dev-0-0-0", "the left image has more stars", "l", "r", True)
    torch.manual_seed(0)
    items = [NLVR2Dataset([pair], {"l": a, "r": b}, mirror=True)[0] for _ in range(40)]
    mirrored = [(p, left, right) for p, left, right in items if p.sentence != pair.sentence]
    assert 5 < len(mirrored) < 35  # about half of the draws
    p, left, right = mirrored[0]
    assert p.sentence == "the right image has more stars" and p.label is True
    assert (p.left_key, p.right_key) == ("r", "l")  # the pair names the images it now holds
    assert torch.equal(left.boxes, b.mirrored().boxes) and torch.equal(right.boxes, a.mirrored().boxes)
    assert all(p is pair and left is a and right is b for p, left, right in items if p.sentence == pair.sentence)
    assert all(NLVR2Dataset([pair], {"l": a, "r": b})[0][0] is pair for _ in range(5))  # off by default


def test_nlvr2_concatenates_left_then_right(tok):
    torch.manual_seed(0)
    model = NLVR2Model(TINY).eval()
    collate = NLVR2Collator(tok, TINY)
    a, b = regions(1), regions(2, k=3)
    pair = NLVR2Pair("dev-0-0-0", "there is a star", "l", "r", True)
    swapped = NLVR2Pair("dev-0-0-1", "there is a star", "r", "l", True)
    batch = collate([(pair, a, b), (swapped, b, a)])
    assert batch.inputs.input_ids.shape[0] == 4 and batch.labels.tolist() == [1, 1]
    with torch.no_grad():
        joint = model.joint(batch.inputs)
        h = TINY.hidden_size
        assert joint.shape == (2, 2 * h)
        # the pair's right half is the swapped pair's left half: the order of the images is kept
        assert torch.allclose(joint[0, :h], joint[1, h:], atol=1e-5) and torch.allclose(joint[0, h:], joint[1, :h], atol=1e-5)
        assert (joint[0] - joint[1]).abs().max() > 1e-4  # so (a, b) and (b, a) are different inputs
        logits = model.logits(batch.inputs)
    assert (logits[0] - logits[1]).abs().max() > 1e-6
    # the left sequences come first: row 0 holds a's regions, row 2 (the swapped pair's left) b's
    assert torch.equal(batch.inputs.region_feats[0, :4], a.features) and torch.equal(batch.inputs.region_feats[1, :3], b.features)


# ---------------------------------------------------------------------------------------------- retrieval


def test_retrieval_negatives_are_never_a_true_pair():
    # image 3 shares a caption with image 0: pairing image 3 with that caption would be a true pair too
    pairs = [(0, "a red circle"), (0, "a big red circle"), (1, "a blue square"), (2, "a green star"),
             (3, "a red circle"), (3, "two hearts"), (4, "a blue square on grass")]
    ds = RetrievalDataset(pairs, None, negatives_per_positive=3, hard_pool=3)
    truth = {}
    for k, t in pairs:
        truth.setdefault(k, set()).add(_norm(t))
    g = torch.Generator().manual_seed(0)
    kinds = set()
    for _ in range(40):
        for i, (key, text) in enumerate(pairs):
            negs = ds.sample_negatives(i, g)
            assert len(negs) == 3
            for k, t in negs:
                assert _norm(t) not in truth[k], (i, k, t)
                kinds.add("image" if t == text else "caption")
                assert k != key or t != text
    assert kinds == {"image", "caption"}  # both kinds of negatives are drawn


def test_scoring_all_pairs_in_batches_equals_one_by_one(tok):
    torch.manual_seed(0)
    model = RetrievalModel(TINY).eval()
    imgs = [regions(i, k=2 + i % 3, tags=[] if i == 2 else None) for i in range(4)]
    texts = ["a red circle", "two stars on a very long line of grass near a tree", "", "heart"]
    full = score_all_pairs(model, tok, imgs, texts, batch_size=5, progress=False)
    assert full.shape == (4, 4)
    for i in range(4):
        for t in range(4):
            one = score_pairs(model, tok, [imgs[i]], [texts[t]])
            assert torch.allclose(full[i, t], one[0], atol=1e-5), (i, t)
    assert full.std() > 0


def test_chance_recall():
    c = chance_recall([0, 0, 1, 1, 2, 2, 3, 3, 4, 4], 5, ks=(1, 5))
    assert c["IR@1"] == pytest.approx(20.0) and c["IR@5"] == pytest.approx(100.0)
    assert c["TR@1"] == pytest.approx(20.0)  # 2 of 10 captions are right
    assert c["TR@5"] == pytest.approx(100 * (1 - 56 / 252))  # 1 - C(8,5)/C(10,5)


# ---------------------------------------------------------------------------------------------- overfit


def _fit(model, batches, steps: int, lr: float = 3e-3) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for s in range(steps):
        loss = model(batches[s % len(batches)])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_tiny_vqa_overfit_beats_chance(tok):
    torch.manual_seed(0)
    answers = ["yes", "no", "red", "blue"]
    examples = [VQAExample(i, i, ["is it red?", "what color?"][i % 2], {i % 4: 1.0}) for i in range(8)]
    items = [(e, regions(100 + e.question_id)) for e in examples]
    batch = VQACollator(tok, TINY, len(answers))(items)
    model = VQAModel(TINY, len(answers))
    _fit(model, [batch], 80)
    idx, _ = model.predict(tok, [r for _, r in items], [e.question for e, _ in items])
    acc = (idx[:, 0] == torch.tensor([i % 4 for i in range(8)])).float().mean().item()
    assert acc >= 0.75  # chance: 0.25


def test_vqa_text_mean_pooling_reads_the_tokens_not_their_padding(tok):
    from minivlm.errors import MiniVLMError

    torch.manual_seed(0)
    items = [(VQAExample(0, 0, "what color is the star?", {0: 1.0}), regions(7))]
    mean, cls = VQAModel(TINY, 4, "text-mean").eval(), VQAModel(TINY, 4).eval()
    cls.load_state_dict(mean.state_dict())  # same weights: only the pooling differs
    short = VQACollator(tok, TINY, 4)(items).inputs
    assert not torch.allclose(mean.logits(short), cls.logits(short))
    # the same tokens padded wider: the mean is over real tokens only
    pad = torch.nn.functional.pad
    wide = dataclasses.replace(short, **{k: pad(getattr(short, k), (0, 5)) for k in
                                         ("input_ids", "token_type_ids", "position_ids", "text_mask", "maskable")})
    assert torch.allclose(mean.logits(short), mean.logits(wide), atol=1e-5)
    with pytest.raises(MiniVLMError, match="pooling"):
        VQAModel(TINY, 4, "max")


@pytest.mark.parametrize("pool", NLVR2_POOLS)
def test_tiny_nlvr2_overfit_beats_chance(tok, pool):
    torch.manual_seed(0)
    labels = [True, False, False, True, True, False, True, False]
    items = [(NLVR2Pair(f"train-{i}-0-0", ["both have a star", "one has a ring"][i % 2], i, i + 50, lab),
              regions(200 + i), regions(300 + i)) for i, lab in enumerate(labels)]
    batch = NLVR2Collator(tok, TINY)(items)
    model = NLVR2Model(TINY, pool)
    _fit(model, [batch], 60)
    p = model.predict(tok, [a for _, a, _ in items], [b for _, _, b in items], [x.sentence for x, _, _ in items])
    acc = ((p > 0.5) == torch.tensor(labels)).float().mean().item()
    assert acc >= 0.875  # chance: 0.5


def test_tiny_retrieval_overfit_beats_chance(tok):
    torch.manual_seed(0)
    caps = ["a red circle", "a blue square", "a green star", "two pink hearts"]
    imgs = {i: regions(400 + i) for i in range(4)}
    ds = RetrievalDataset([(i, c) for i, c in enumerate(caps)], imgs, negatives_per_positive=3, hard_pool=1)
    collate = RetrievalCollator(tok, TINY)
    batches = [collate([ds[i] for i in range(4)]) for _ in range(6)]
    assert (batches[0].labels == MISMATCHED).sum() == 12
    model = RetrievalModel(TINY)
    _fit(model, batches, 90)
    scores = score_all_pairs(model, tok, [imgs[i] for i in range(4)], caps, progress=False)
    ir1 = (scores.argmax(0) == torch.arange(4)).float().mean().item()
    tr1 = (scores.argmax(1) == torch.arange(4)).float().mean().item()
    assert ir1 >= 0.75 and tr1 >= 0.75  # chance: 0.25


# ---------------------------------------------------------------------------------------------- finetune command


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A generated world of 20 images + 8 NLVR2 pairs, random region features for every image, and a tiny
    "pre-trained" folder."""
    from minivlm.data.feature_store import FeatureStoreWriter
    from minivlm.data.synthetic import generate_world
    from minivlm.data.world import World
    from minivlm import checkpoint
    from minivlm.config import to_dict
    from minivlm.tasks.pretrain import PretrainModel

    root = tmp_path_factory.mktemp("ft")
    generate_world(root / "world", images=20, seed=0, nlvr2_pairs=8, workers=1)
    w = World(root / "world")
    names = w.class_names()
    with FeatureStoreWriter(root / "store", meta={"class_names": names}) as wr:
        for split in w.splits():
            for iid in w.instances(split).images:
                wr.add(iid, store_regions(iid, names, iid % len(names)))
    with FeatureStoreWriter(root / "nlvr2_store", meta={"class_names": names}) as wr:
        for split in w.splits("nlvr2"):
            for e in w.nlvr2(split):
                for j, name in enumerate((e.left_image, e.right_image)):
                    wr.add(f"{split}/{name}", store_regions(len(name) + j, names, j))  # as `extract --images`
    torch.manual_seed(0)
    checkpoint.write(root / "pre", "pretrain", {"bert": to_dict(TINY)}, PretrainModel(TINY).state_dict())
    return root


def _finetune(root, task: str, *extra: str, name: str | None = None) -> tuple[int, dict]:
    from minivlm.cli import main

    out = root / (name or f"out_{task}")
    rc = main(["finetune", "--task", task, "--data", str(root / "world"), "--features", str(root / "store"),
               "--nlvr2-features", str(root / "nlvr2_store"), "--pretrained", str(root / "pre"), "--out", str(out),
               "--steps", "3", "--batch-size", "4", "--eval-batch-size", "16", *extra])
    return rc, json.loads((out / "metrics.json").read_text()) if rc == 0 else {}


def test_finetune_vqa_writes_results_metrics_and_task_folder(tiny_world):
    from minivlm.eval.vqa_eval import read_vqa_results
    from minivlm import checkpoint

    rc, m = _finetune(tiny_world, "vqa", "--num-answers", "5")
    out = tiny_world / "out_vqa"
    assert rc == 0 and m["num_answers"] == 5 and set(m["eval"]) == {"val", "test"}
    val = m["eval"]["val"]
    assert 0 <= val["accuracy"] <= 100 and "accuracy" in val["baseline_most_frequent"] and val["per_question_type"]
    results = read_vqa_results(out / "results_val.json")  # the official format reads back
    assert len(results) == val["n_questions"] > 0
    info = checkpoint.read(out, "task")
    spec = info.task_spec()
    assert spec.task == "vqa" and len(info.answers()) == 5 and spec.bert.hidden_size == TINY.hidden_size
    assert "loaded" in (out / "init_report.txt").read_text()  # started from the pre-trained folder
    # rerunning the finished command resumes at its last step: no training step is repeated
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    rc, _ = _finetune(tiny_world, "vqa", "--num-answers", "5")
    again = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert rc == 0 and [s for s in again if s not in steps] == [] and max(again) == 3


def test_vqa_and_nlvr2_pooling_is_kept_by_the_task_folder(tiny_world):
    from minivlm.model import load_task_folder

    rc, _ = _finetune(tiny_world, "vqa", "--num-answers", "5", "--vqa-pool", "text-mean", name="out_mean")
    _, model = load_task_folder(tiny_world / "out_mean")
    assert rc == 0 and model.pool == "text-mean"
    rc, _ = _finetune(tiny_world, "nlvr2", "--nlvr2-pool", "region-attention", name="out_nlvr2_ra")
    _, model = load_task_folder(tiny_world / "out_nlvr2_ra")
    assert rc == 0 and model.pool == "region-attention" and hasattr(model, "region_attention")


def test_vqa_curriculum_trains_attribute_questions_first_and_resumes(tiny_world):
    from minivlm.data.world import World
    from minivlm.tasks.vqa import ATTRIBUTE_QUESTION_TYPES

    rc, m = _finetune(tiny_world, "vqa", "--num-answers", "5", "--curriculum-epochs", "2", name="out_curriculum")
    out = tiny_world / "out_curriculum"
    train_q = World(tiny_world / "world").vqa("train")
    n_attr = sum(q.question_type.startswith(ATTRIBUTE_QUESTION_TYPES) for q in train_q)
    assert rc == 0 and 0 < m["curriculum"]["n_train"] <= n_attr < m["n_train"]
    phase = [json.loads(line) for line in (out / "curriculum" / "log.jsonl").read_text().splitlines()]
    steps_per_epoch = -(-m["curriculum"]["n_train"] // 4)
    assert max(e["step"] for e in phase) == 2 * steps_per_epoch  # its own epochs, not the main run's --steps
    assert (out / "curriculum" / "model.safetensors").is_file() and m["train"]["step"] == 3
    # a rerun skips the finished curriculum and the finished main run: no step is trained twice
    rc, _ = _finetune(tiny_world, "vqa", "--num-answers", "5", "--curriculum-epochs", "2", name="out_curriculum")
    again = [json.loads(line) for line in (out / "curriculum" / "log.jsonl").read_text().splitlines()]
    assert rc == 0 and len(again) == len(phase)


def test_vqa_curriculum_can_take_the_yes_no_questions_too(tiny_world):
    from minivlm.data.world import World
    from minivlm.tasks.vqa import ATTRIBUTE_QUESTION_TYPES, YES_NO_QUESTION_TYPES

    rc, m = _finetune(tiny_world, "vqa", "--num-answers", "5", "--curriculum-epochs", "1", "--curriculum-yes-no",
                      name="out_curriculum_yes_no")
    train_q = World(tiny_world / "world").vqa("train")
    n_attr = sum(q.question_type.startswith(ATTRIBUTE_QUESTION_TYPES) for q in train_q)
    n_yes_no = sum(q.question_type.startswith(YES_NO_QUESTION_TYPES) for q in train_q)
    assert rc == 0 and n_yes_no > 0 and n_attr < m["curriculum"]["n_train"] <= n_attr + n_yes_no


def test_finetune_nlvr2_and_retrieval(tiny_world):
    from minivlm.eval.nlvr2 import read_nlvr2_results
    from minivlm.eval.retrieval import read_retrieval_results

    from minivlm.data.world import World

    rc, m = _finetune(tiny_world, "nlvr2")
    assert rc == 0 and set(m["eval"]) == {"dev", "test1"} and m["eval"]["dev"]["chance"] == 50.0
    # every example found its two images, though the store keys them by path ("train/train-0-0-img0.png")
    assert m["n_train"] == len(World(tiny_world / "world").nlvr2("train"))
    assert len(read_nlvr2_results(tiny_world / "out_nlvr2" / "results_dev.json")) == m["eval"]["dev"]["n_examples"]
    rc, m = _finetune(tiny_world, "retrieval", "--negatives", "2")
    assert rc == 0 and list(m["eval"]) == ["test"]
    r = m["eval"]["test"]
    scores, t2i = read_retrieval_results(tiny_world / "out_retrieval" / "results_test.json")
    assert scores.shape == (r["n_images"], r["n_texts"]) and len(t2i) == r["n_texts"]
    assert {"TR@1", "IR@10"} <= set(r["full"]) and r["chance"]["IR@1"] == pytest.approx(100 / r["n_images"])


def test_finetune_refuses_features_of_another_width(tiny_world, capsys):
    from minivlm.cli import main

    wide = BertConfig(**{**TINY.__dict__, "region_dim": 2048})
    from minivlm import checkpoint
    from minivlm.config import to_dict
    from minivlm.tasks.pretrain import PretrainModel

    checkpoint.write(tiny_world / "pre_wide", "pretrain", {"bert": to_dict(wide)}, PretrainModel(wide).state_dict())
    rc = main(["finetune", "--task", "vqa", "--data", str(tiny_world / "world"), "--features",
               str(tiny_world / "store"), "--pretrained", str(tiny_world / "pre_wide"), "--out",
               str(tiny_world / "out_wide"), "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "2048" in err and "16" in err and "Traceback" not in err


def test_finetune_caption_through_the_caption_trainer(tiny_world):
    from minivlm.eval.caption_metrics import read_caption_results
    from minivlm.model import load_task_folder

    rc, m = _finetune(tiny_world, "caption", "--max-eval", "2")
    out = tiny_world / "out_caption"
    assert rc == 0 and set(m["eval"]) == {"val", "test"}
    assert {"CIDEr", "Bleu_4"} <= set(m["eval"]["val"]["model"]) and "CIDEr" in m["eval"]["val"]["baseline_most_common_caption"]
    assert len(read_caption_results(out / "results_val.json")) == 2
    # the captions' object words against the images' objects; the references name them right by construction
    grounding = m["eval"]["val"]["grounding"]
    assert grounding["references"]["class_precision"] == grounding["references"]["colour_precision"] == 100.0
    assert "colour_precision" in m["eval"]["val"]["metrics"]
    assert "baseline_shuffled_colour_precision" in m["eval"]["val"]["baselines"]
    info, model = load_task_folder(out)  # the task folder that `MiniVLM.assemble` takes
    assert info.task_spec().task == "caption" and model.cfg.hidden_size == TINY.hidden_size
    assert not (out / "model").exists()  # the weights are written once, in the task folder


def test_finetune_caption_every_token_then_scst_steps(tiny_world):
    rc, _ = _finetune(tiny_world, "caption", "--max-eval", "2", "--caption-objective", "every-token",
                      "--scst-steps", "6", name="out_caption_scst")
    out = tiny_world / "out_caption_scst"
    ce = [json.loads(line) for line in (out / "ce" / "log.jsonl").read_text().splitlines()]
    scst = [json.loads(line) for line in (out / "scst" / "log.jsonl").read_text().splitlines()]
    assert rc == 0 and ce[-1]["step"] == 3 and 0 <= ce[-1]["acc"] <= 1
    # SCST runs one row per image: --scst-steps counts steps over images, not over captions
    assert scst[-1]["step"] == 6 and "reward" in scst[-1]


def test_a_finetuned_folder_initialises_another_task(tiny_world):
    from minivlm.io import load_weights
    from minivlm.tasks.data import init_from_pretrained

    torch.manual_seed(1)
    model = NLVR2Model(TINY)
    summary = init_from_pretrained(model, tiny_world / "out_vqa")  # the VQA model's transformer and pooler
    vqa = load_weights(tiny_world / "out_vqa" / "model.safetensors")
    assert summary.startswith("loaded") and "head." in summary  # NLVR2's head has another shape: left as is
    assert torch.equal(model.bert.layers[1].ffn_in.weight, vqa["bert.layers.1.ffn_in.weight"])
    assert torch.equal(model.pooler.dense.weight, vqa["pooler.dense.weight"])


def test_every_registered_task_has_every_protocol_member():
    import inspect

    from minivlm.tasks import data
    from minivlm.tasks.registry import TASKS
    from minivlm.tasks.task import MEMBERS, Task

    assert tuple(TASKS) == data.TASKS  # the names the checkpoint and the model folder know
    for name, cls in TASKS.items():
        assert issubclass(cls, Task) and cls.name == name and not inspect.isabstract(cls), name
        for member in MEMBERS:
            assert getattr(cls, member, None) is not None, (name, member)


def test_vqa_region_attention_reads_real_regions_only(tok):
    torch.manual_seed(0)
    model = VQAModel(TINY, 4, "region-attention").eval()
    items = [(VQAExample(0, 0, "what color is the star?", {0: 1.0}), regions(7)),
             (VQAExample(1, 1, "what color is the ring?", {1: 1.0}), regions(8, k=2))]
    inputs = VQACollator(tok, TINY, 4)(items).inputs
    logits = model.logits(inputs)
    # the second image's two padded region slots hold garbage: its answer must not move
    noisy = dataclasses.replace(inputs, region_feats=inputs.region_feats.clone())
    noisy.region_feats[1, 2:] = 100.0
    assert torch.allclose(model.logits(noisy), logits, atol=1e-5)
    # but what a real region holds does move it
    noisy.region_feats[1, :2] += 1.0
    assert not torch.allclose(model.logits(noisy)[1], logits[1], atol=1e-3)
    # an image without regions still gets an answer
    empty = VQACollator(tok, TINY, 4)([(items[0][0], None)]).inputs
    assert torch.isfinite(model.logits(empty)).all()


def test_region_attention_null_slot_says_nothing_is_there():
    """Keys and queries as identities: a region scores by how well it fits the question. With the null slot
    (its key a threshold) the result is the fitting region when one is there and the null value when none is;
    softmax over the regions alone returns some mix of regions either way."""
    cfg = dataclasses.replace(TINY, hidden_size=8)
    plain, null = RegionAttention(cfg), RegionAttention(cfg, null_slot=True)
    with torch.no_grad():
        for m in (plain, null):
            for layer in (m.query, m.key):
                layer.weight.copy_(torch.eye(8))
                layer.bias.zero_()
        null.null_key.fill_(5.0)
        null.null_value.copy_(-torch.ones(8))
    eye = torch.eye(8) * 10
    states = torch.stack([eye[0], eye[1], torch.full((8,), 99.0)]).unsqueeze(0)  # the third slot is padding
    mask = torch.tensor([[True, True, False]])
    present, absent = eye[0].unsqueeze(0), eye[2].unsqueeze(0)
    assert torch.allclose(null(present, states, mask), eye[0], atol=1e-3)
    assert torch.allclose(null(absent, states, mask), -torch.ones(8), atol=1e-3)
    assert torch.allclose(plain(absent, states, mask), (eye[0] + eye[1]) / 2, atol=1e-3)  # no way to say "none"
    no_regions = torch.zeros(1, 3, dtype=torch.bool)
    assert torch.allclose(null(present, states, no_regions), -torch.ones(8))
    assert torch.allclose(null(present, states[:, :0], no_regions[:, :0]), -torch.ones(8))  # a batch of no regions
    assert torch.equal(plain(present, states, no_regions), torch.zeros(1, 8))
    # a VQA model with the slot: padded slots still never move its answer
    torch.manual_seed(0)
    model = VQAModel(TINY, 4, "region-attention", null_region=True).eval()
    inputs = VQACollator(get_tokenizer(), TINY, 4)([(VQAExample(0, 0, "is there a star?", {0: 1.0}), regions(8, k=2)),
                                                   (VQAExample(1, 1, "is there a ring?", {1: 1.0}), regions(9))]).inputs
    noisy = dataclasses.replace(inputs, region_feats=inputs.region_feats.clone())
    noisy.region_feats[0, 2:] = 100.0
    assert torch.allclose(model.logits(noisy), model.logits(inputs), atol=1e-5)


def test_vqa_region_attention_binds_the_named_object_to_its_colour(tok):
    """Each image holds three objects of different classes and colours (one-hot features); the question
    names one. Held out: class/colour pairs never seen together in training. The attention head must find
    the named region and read its colour."""
    torch.manual_seed(0)
    colours, classes = ["red", "blue", "green", "pink"], TAGS[:4]
    cfg = dataclasses.replace(TINY, region_dim=8)
    g = torch.Generator().manual_seed(0)

    def image(i: int) -> tuple[VQAExample, Regions, int]:
        cls = torch.randperm(4, generator=g)[:3]
        col = torch.randperm(4, generator=g)[:3]
        feats = torch.cat([F.one_hot(cls, 4), F.one_hot(col, 4)], 1).float()
        boxes = torch.tensor([[10.0 + 30 * k, 10, 30 + 30 * k, 30] for k in range(3)])
        r = Regions(boxes=boxes, features=feats, scores=torch.ones(3), labels=cls, image_size=(100, 100), tags=[])
        k = int(torch.randint(3, (1,), generator=g))
        return VQAExample(i, i, f"what color is the {classes[cls[k]]}?", {int(col[k]): 1.0}), r, int(col[k])

    data = [image(i) for i in range(160)]
    train, test = data[:128], data[128:]
    collate = VQACollator(tok, cfg, 4)
    batches = [collate([(e, r) for e, r, _ in train[i:i + 32]]) for i in range(0, 128, 32)]
    model = VQAModel(cfg, 4, "region-attention")
    _fit(model, batches, 240, lr=2e-3)
    idx, _ = model.predict(tok, [r for _, r, _ in test], [e.question for e, _, _ in test], top_k=1)
    acc = (idx[:, 0] == torch.tensor([c for _, _, c in test])).float().mean().item()
    assert acc >= 0.9, acc  # reading any one of the three regions: ~1/3


def test_pick_compare_reads_real_regions_and_learns_what_is_beside_an_object(tok):
    """Three objects in a row, one-hot classes; "what is left / right of the X?" asks for the class of X's
    neighbour: a pick of X, then of the region beside it. Held out: 32 scenes. Padded region slots never move
    the answer; an image without regions still gets one."""
    torch.manual_seed(0)
    classes, cfg = TAGS[:4], dataclasses.replace(TINY, region_dim=8)
    g = torch.Generator().manual_seed(0)

    def image(i: int) -> tuple[VQAExample, Regions, int]:
        cls = torch.randperm(4, generator=g)[:3]
        boxes = torch.tensor([[10.0 + 30 * k, 40, 30 + 30 * k, 60] for k in range(3)])
        r = Regions(boxes=boxes, features=F.one_hot(cls, 8).float(), scores=torch.ones(3), labels=cls,
                    image_size=(100, 100), tags=[])
        k, side = (1 + int(torch.randint(2, (1,), generator=g)), "left") if torch.rand(1, generator=g) < 0.5 \
            else (int(torch.randint(2, (1,), generator=g)), "right")
        answer = int(cls[k - 1] if side == "left" else cls[k + 1])
        return VQAExample(i, i, f"what is {side} of the {classes[cls[k]]}?", {answer: 1.0}), r, answer

    data = [image(i) for i in range(192)]
    train, test = data[:160], data[160:]
    collate = VQACollator(tok, cfg, 4)
    model = VQAModel(cfg, 4, "pick-compare", null_region=True)
    inputs = collate([(e, r) for e, r, _ in test[:2]]).inputs
    noisy = dataclasses.replace(inputs, region_feats=inputs.region_feats.clone(), region_mask=inputs.region_mask.clone())
    noisy.region_mask[1, 2:] = False
    padded = dataclasses.replace(noisy, region_feats=noisy.region_feats.clone())
    padded.region_feats[1, 2:] = 100.0
    model.eval()
    assert torch.allclose(model.logits(padded), model.logits(noisy), atol=1e-5)
    assert not torch.allclose(model.logits(noisy)[1], model.logits(inputs)[1], atol=1e-4)
    assert torch.isfinite(model.logits(collate([(test[0][0], None)]).inputs)).all()
    _fit(model, [collate([(e, r) for e, r, _ in train[i:i + 32]]) for i in range(0, 160, 32)], 200, lr=2e-3)
    idx, _ = model.predict(tok, [r for _, r, _ in test], [e.question for e, _, _ in test], top_k=1)
    acc = (idx[:, 0] == torch.tensor([c for _, _, c in test])).float().mean().item()
    assert acc >= 0.9, acc  # the most frequent class: ~1/3


def test_count_targets_are_the_best_answer_when_it_is_a_number():
    numbers = answer_numbers(["yes", "2", "no", "0", "red", "10"])
    assert numbers.tolist() == [-1, 2, -1, 0, -1, 10]
    targets = torch.tensor([[0, 1.0, 0, 0.3, 0, 0],  # "2"
                            [0, 0, 0, 1.0, 0, 0],  # "0": a count too
                            [1.0, 0, 0, 0.3, 0, 0],  # "yes" is best: not a counting question
                            [0, 0, 0, 0, 0, 0]])  # no answer in the set
    value, is_count = count_targets(targets, numbers)
    assert is_count.tolist() == [True, True, False, False] and value[:2].tolist() == [2, 0]


def _counting_data(tok, cfg, n: int, seed: int):
    """Images of 1-5 one-hot objects of 4 classes; "how many <class>s are there?", answers "0".."5"."""
    g = torch.Generator().manual_seed(seed)
    classes = ["circles", "squares", "stars", "hearts"]
    out = []
    for i in range(n):
        k = int(torch.randint(1, 6, (1,), generator=g))
        cls = torch.randint(4, (k,), generator=g)
        boxes = torch.tensor([[5.0 + 18 * j, 10, 20 + 18 * j, 30] for j in range(k)])
        r = Regions(boxes=boxes, features=F.one_hot(cls, cfg.region_dim).float(), scores=torch.ones(k), labels=cls,
                    image_size=(100, 100), tags=[])
        asked = int(cls[int(torch.randint(k, (1,), generator=g))]) if torch.rand(1, generator=g) < 0.8 else \
            int(torch.randint(4, (1,), generator=g))
        n_true = int((cls == asked).sum())
        out.append((VQAExample(i, i, f"how many {classes[asked]} are there?", {n_true: 1.0}), r, n_true))
    return out


def test_vqa_region_count_counts_the_named_class_on_new_images(tok):
    """The count head sums a sigmoid per region and its first count is fitted to the answer: on new images that
    count must follow how many regions of the named class there are."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, region_dim=8)
    answers = [str(i) for i in range(6)]
    data = _counting_data(tok, cfg, 384, seed=0)
    train, test = data[:256], data[256:]
    collate = VQACollator(tok, cfg, len(answers))
    batches = [collate([(e, r) for e, r, _ in train[i:i + 32]]) for i in range(0, 256, 32)]
    model = VQAModel(cfg, len(answers), "region-count")
    model.set_answers(answers)
    _fit(model, batches, 300, lr=3e-3)
    idx, _ = model.predict(tok, [r for _, r, _ in test], [e.question for e, _, _ in test], top_k=1)
    truth = torch.tensor([c for _, _, c in test])
    acc = (idx[:, 0] == truth).float().mean().item()
    assert acc >= 0.75, acc  # the most common answer: 57%
    with torch.no_grad():
        _, counts = model.logits_and_counts(collate([(e, r) for e, r, _ in test]).inputs)
    assert (counts[:, 0] - truth).abs().mean() < 0.4, counts[:, 0]  # always the mean count: 0.66; untrained: 1.06


def test_pick_match_counts_and_says_whether_the_named_class_is_there(tok):
    """"how many stars are there?" and "is there a star?" on new images: pick-match's count is a sum of sigmoids of
    the first pick's own region scores, fitted to the counting answers; "is there" reads the same scores and the
    null slot's weight. Answers: "0".."5", "yes", "no"."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, region_dim=8)
    answers = [str(i) for i in range(6)] + ["yes", "no"]
    data = []
    for e, r, n in _counting_data(tok, cfg, 384, seed=1):
        if e.question_id % 2:  # the same scene and class asked the other way
            what = e.question.removeprefix("how many ").removesuffix("s are there?")
            e, n = VQAExample(e.question_id, e.image_key, f"is there a {what}?", {6 if n else 7: 1.0}), 6 if n else 7
        data.append((e, r, n))
    train, test = data[:256], data[256:]
    collate = VQACollator(tok, cfg, len(answers))
    model = VQAModel(cfg, len(answers), "pick-match", null_region=True)
    model.set_answers(answers)
    _fit(model, [collate([(e, r) for e, r, _ in train[i:i + 32]]) for i in range(0, 256, 32)], 300, lr=3e-3)
    idx, _ = model.predict(tok, [r for _, r, _ in test], [e.question for e, _, _ in test], top_k=1)
    truth = torch.tensor([c for _, _, c in test])
    right, exists = idx[:, 0] == truth, truth >= 6
    assert right[exists].float().mean() >= 0.9, right[exists]  # "yes" always: ~80%
    assert right[~exists].float().mean() >= 0.75, right[~exists]  # the most common count: ~55%
    with torch.no_grad():
        _, counts = model.logits_and_counts(collate([(e, r) for e, r, _ in test]).inputs)
    assert (counts[~exists, 0] - truth[~exists]).abs().mean() < 0.4, counts[~exists, 0]  # the regions it names


def test_region_count_pool_is_kept_by_the_folder_and_starts_nlvr2(tmp_path):
    from minivlm.io import write_lines
    from minivlm.model import build_task_model, load_task_folder, write_task_config
    from minivlm.tasks.data import init_from_pretrained

    answers = ["yes", "no", "2", "3"]
    vqa = build_task_model("vqa", TINY, len(answers), extra={"pool": "region-count"})
    vqa.set_answers(answers)
    write_task_config(tmp_path / "vqa", "vqa", TINY, state=vqa.state_dict(), num_answers=len(answers),
                      pool="region-count")
    write_lines(tmp_path / "vqa" / "answers.txt", answers)
    _, loaded = load_task_folder(tmp_path / "vqa")
    assert loaded.pool == "region-count" and loaded.answer_numbers.tolist() == [-1, -1, 2, 3]
    nlvr2 = build_task_model("nlvr2", TINY, extra={"pool": "region-count"})
    init_from_pretrained(nlvr2, tmp_path / "vqa")  # the count head fitted by VQA's counting questions carries over
    assert torch.equal(nlvr2.region_count.key.weight, vqa.region_count.key.weight)


def test_regions_below_the_score_floor_do_not_enter_the_transformer():
    import numpy as np

    from minivlm.edge import EdgeRegions
    from minivlm.edge import collate_regions as edge_collate
    from minivlm.fusion.inputs import collate_regions

    a, b = regions(3, k=5), regions(4, k=2)
    a.scores = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.3])
    b.scores = torch.tensor([0.1, 0.15])  # nothing confident: the best region still enters
    feats, boxes, mask = collate_regions([a, b], TINY.region_dim, 4, min_score=0.2)
    assert mask.sum(1).tolist() == [3, 1] and torch.equal(feats[1, 0], b.features[1])
    assert torch.equal(feats[0, :3], a.features[[0, 2, 4]])  # the confident ones, best first
    assert collate_regions([a, b], TINY.region_dim, 4)[2].sum(1).tolist() == [4, 2]  # no floor: the top 4
    # the ONNX runtime's inputs pick the same regions
    edge = [EdgeRegions(r.boxes.numpy(), r.features.numpy(), r.scores.numpy(), r.labels.numpy(), r.image_size)
            for r in (a, b)]
    e_feats, e_boxes, e_mask = edge_collate(edge, TINY.region_dim, 4, min_score=0.2)
    assert e_mask.sum(1).tolist() == [3, 1]
    np.testing.assert_array_equal(e_feats[:, :3], feats[:, :3].numpy())
    np.testing.assert_allclose(e_boxes[0, :3], boxes[0, :3].numpy(), atol=1e-6)


def test_box_gaps_say_which_relation_holds_and_how_clearly():
    # box code x1, y1, x2, y2, w, h (normalised); the reference in the middle
    ref = torch.tensor([[0.4, 0.4, 0.6, 0.6, 0.2, 0.2]])
    boxes = torch.tensor([[[0.1, 0.45, 0.3, 0.55, 0.2, 0.1],     # left of it, a gap of 0.1
                           [0.7, 0.45, 0.8, 0.55, 0.1, 0.1],     # right of it
                           [0.45, 0.0, 0.55, 0.39, 0.1, 0.39],   # above it, barely
                           [0.5, 0.5, 0.7, 0.7, 0.2, 0.2]]])     # overlapping: no relation holds
    gaps = box_gaps(boxes, ref)[0]  # left of, right of, above, below
    assert gaps.argmax(1)[:3].tolist() == [0, 1, 2]
    assert gaps[0, 0] == pytest.approx(math.tanh(0.8)) and 0 < gaps[2, 2] < 0.1
    assert (gaps[3] < 0).all() and (gaps[0, 1:] < 0).all()


def test_pick_relate_splits_the_question_at_the_relation_word_and_picks_by_the_boxes():
    """Pick 1 reads only the words before the split's word and pick 2 only those after; the relation's weights of
    the box gaps move pick 1 to the region left (or right) of pick 2's box. Tokens are one-hot, so the split's
    scores can be set by hand: it scores dimension 3, so token 3 is the relation word."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, hidden_size=16)
    head = PickCompare(cfg, null_slot=True, match=True, relate=True).eval()
    score = head.words[3].score
    with torch.no_grad():
        for layer in (score[0], score[2]):
            layer.weight.zero_(), layer.bias.zero_()
        score[0].weight[0, 3], score[2].weight[0, 0] = 1.0, 50.0
    tokens, words = torch.eye(16)[:6].unsqueeze(0) * 2, torch.ones(1, 6, dtype=torch.bool)
    regions, region_mask = torch.randn(1, 3, 16), torch.ones(1, 3, dtype=torch.bool)
    boxes = torch.tensor([[[0.1, 0.4, 0.2, 0.5, 0.1, 0.1], [0.5, 0.4, 0.6, 0.5, 0.1, 0.1],
                           [0.8, 0.4, 0.9, 0.5, 0.1, 0.1]]])
    assert head.words[3].weights(tokens, words)[0].argmax() == 3

    def queries(tokens):
        seen = {}
        hooks = [head.words[i].register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, out)) for i in (0, 1)]
        with torch.no_grad():
            head(tokens, words, regions, region_mask, boxes)
        for h in hooks:
            h.remove()
        return seen[0], seen[1]

    q1, q2 = queries(tokens)
    before, after = tokens.clone(), tokens.clone()
    before[0, 1] *= 3  # a word before the split
    after[0, 5] *= 3  # a word after it
    q1_before, q2_before = queries(before)
    q1_after, q2_after = queries(after)
    assert not torch.allclose(q1_before, q1, atol=1e-2) and torch.allclose(q2_before, q2, atol=1e-3)
    assert torch.allclose(q1_after, q1, atol=1e-3) and not torch.allclose(q2_after, q2, atol=1e-2)

    a = head.picks[0]
    with torch.no_grad():  # every region matches equally: pick 2's box is their mean, x 0.47-0.57
        for t in (a.query.weight, a.query.bias, a.key.weight, a.key.bias, head.relation_pick.weight):
            t.zero_()
    for relation, region in (([20.0, 0, 0, 0], 0), ([0, 20.0, 0, 0], 2)):  # left of it, right of it
        with torch.no_grad():
            head.relation_pick.bias.copy_(torch.tensor(relation))
            out, _ = head(tokens, words, regions, region_mask, boxes)
        assert torch.allclose(out[0, :16], regions[0, region], atol=1e-3), relation  # pick 1's state
