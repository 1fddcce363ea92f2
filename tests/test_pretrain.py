"""VL pre-training: MLM masks, ITM pollution, corpus tag sources, the model's losses, the command end to end."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from minivlm.cli import main as cli_main
from minivlm.config import BertConfig, PretrainTaskConfig
from minivlm.data.feature_store import FeatureStore, FeatureStoreWriter
from minivlm.data.world import World
from minivlm import checkpoint
from minivlm.fusion.loading import load_text_weights
from minivlm.regions import Regions
from minivlm.tasks.corpus import PretrainExample, build_corpus, pseudo_caption_corpus, split_texts
from minivlm.tasks.pretrain import (IGNORE, PretrainCollator, PretrainDataset, PretrainModel, evaluate,
                                    first_word_piece, fixed_batches, mask_tokens, swap_batches, word_families)
from minivlm.text.tokenizer import get_tokenizer

CLASSES = ["circle", "square", "triangle", "star", "heart", "cross"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
DIM = 32
TINY = BertConfig("tiny", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, dropout=0.0,
                  region_dim=DIM, max_regions=6, max_text_len=16, max_tag_len=8)


# ---------------------------------------------------------------------------------------------- a mini world


def _region_feature(cls: int, colour: int, rng: random.Random) -> torch.Tensor:
    f = torch.tensor([rng.gauss(0, 0.3) for _ in range(DIM)])
    f[cls] += 2.0
    f[len(CLASSES) + colour] += 2.0
    return f


def make_mini_world(root: Path, n_train: int = 24, n_val: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """COCO-style instances/captions + VQA files for `train`/`val`, and a feature store whose regions
    encode each object's class and colour (what MLM and ITM can learn from). Returns (root, store)."""
    rng = random.Random(seed)
    cats = [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]
    store_root = root / "features"
    with FeatureStoreWriter(store_root, meta={"class_names": CLASSES, "feature_dim": DIM}, shard_size=16) as w:
        next_id = 1
        for split, n in (("train", n_train), ("val", n_val)):
            images, objs, caps, qs, anns = [], [], [], [], []
            for _ in range(n):
                iid = next_id
                next_id += 1
                images.append({"id": iid, "file_name": f"{iid}.png", "width": 200, "height": 100})
                k = rng.randint(1, 3)
                picks = [(rng.randrange(len(CLASSES)), rng.randrange(len(COLOURS))) for _ in range(k)]
                boxes, feats = [], []
                for j, (c, col) in enumerate(picks):
                    x, y, bw, bh = rng.uniform(0, 100), rng.uniform(0, 50), rng.uniform(10, 90), rng.uniform(10, 45)
                    objs.append({"id": len(objs) + 1, "image_id": iid, "category_id": c + 1, "bbox": [x, y, bw, bh],
                                 "area": bw * bh, "iscrowd": 0})
                    boxes.append([x, y, x + bw, y + bh])
                    feats.append(_region_feature(c, col, rng))
                phrase = " and ".join(f"a {COLOURS[col]} {CLASSES[c]}" for c, col in picks)
                caps += [{"id": len(caps) + 1, "image_id": iid, "caption": f"{phrase}."},
                         {"id": len(caps) + 2, "image_id": iid, "caption": f"there is {phrase} in the picture."}]
                c, col = picks[0]
                qid = iid * 10
                qs.append({"image_id": iid, "question": f"what colour is the {CLASSES[c]}?", "question_id": qid})
                anns.append({"question_id": qid, "image_id": iid, "question_type": "what color", "answer_type": "other",
                             "multiple_choice_answer": COLOURS[col],
                             "answers": [{"answer": COLOURS[col], "answer_confidence": "yes", "answer_id": a + 1}
                                         for a in range(10)]})
                w.add(iid, Regions(boxes=torch.tensor(boxes), features=torch.stack(feats),
                                   scores=torch.linspace(0.9, 0.5, k), labels=torch.tensor([c for c, _ in picks]),
                                   image_size=(200, 100), tags=[CLASSES[c] for c, _ in picks]))
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            (root / "vqa").mkdir(parents=True, exist_ok=True)
            (root / "annotations" / f"instances_{split}.json").write_text(
                json.dumps({"images": images, "annotations": objs, "categories": cats}))
            (root / "annotations" / f"captions_{split}.json").write_text(
                json.dumps({"images": images, "annotations": caps}))
            (root / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": qs}))
            (root / "vqa" / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": anns}))
    return root, store_root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_mini_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


# ---------------------------------------------------------------------------------------------- masking


def test_mask_rates_and_specials(tok):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2000, 20000, (400, 60), generator=g)
    maskable = torch.rand(400, 60, generator=g) < 0.7
    ids[~maskable] = tok.sep_id
    task = PretrainTaskConfig()
    low = first_word_piece(tok)
    masked, labels = mask_tokens(ids, maskable, tok.mask_id, (low, tok.vocab_size), task, g)
    chosen = labels != IGNORE
    assert not (chosen & ~maskable).any() and torch.equal(masked[~maskable], ids[~maskable])
    assert torch.equal(labels[chosen], ids[chosen])
    rate = chosen.sum() / maskable.sum()
    assert abs(rate - 0.15) < 0.01
    n = chosen.sum()
    to_mask = (masked == tok.mask_id) & chosen
    unchanged = (masked == ids) & chosen
    rand = chosen & ~to_mask & ~unchanged
    assert abs(to_mask.sum() / n - 0.8) < 0.02
    assert abs(rand.sum() / n - 0.1) < 0.02 and abs(unchanged.sum() / n - 0.1) < 0.02
    assert masked[rand].min() >= low and tok.id_to_token(low) == "!"  # never [unusedN] or specials
    # an all-special batch chooses nothing; a batch with one maskable token always chooses it
    none_ids, none_labels = mask_tokens(ids[:2], torch.zeros_like(maskable[:2]), tok.mask_id, (low, 30522), task, g)
    assert torch.equal(none_ids, ids[:2]) and (none_labels == IGNORE).all()
    one = torch.zeros_like(maskable[:1])
    one[0, 5] = True
    assert (mask_tokens(ids[:1], one, tok.mask_id, (low, 30522), task, g)[1] != IGNORE).sum() == 1


def test_collated_batch_masks_only_text_and_tags(world, tok):
    root, store_root = world
    store = FeatureStore(store_root)
    examples, _ = build_corpus(World(root), "train", store, tag_source="gt")
    collate = PretrainCollator(tok, TINY)
    ds = PretrainDataset(examples, [store])
    g = torch.Generator().manual_seed(0)
    batch = collate([ds.item(i, g) for i in range(16)], g)
    chosen = batch.mlm_labels != IGNORE
    assert chosen.any() and not (chosen & ~batch.maskable).any()
    for special in (tok.cls_id, tok.sep_id, tok.pad_id):
        assert not chosen[batch.input_ids == special].any() or special == tok.mask_id
    assert batch.itm_labels.shape == (16,) and set(batch.itm_labels.tolist()) <= {0, 1}
    assert batch.region_feats.shape[-1] == DIM and batch.token_type_ids.max() == 1


# ---------------------------------------------------------------------------------------------- ITM


def test_itm_pollution(tok):
    n_images = 40
    examples = [PretrainExample(i, 0, f"text of image {i}", [f"tag{i}", "shared"]) for i in range(n_images)]
    regions = {i: Regions(torch.tensor([[0.0, 0, 10, 10]]), torch.randn(1, DIM), torch.ones(1),
                          torch.zeros(1, dtype=torch.long), (20, 20)) for i in range(n_images)}
    ds = PretrainDataset(examples, [regions])
    g = torch.Generator().manual_seed(0)
    items = [ds.item(i % n_images, g) for i in range(2000)]
    polluted = [it for it in items if it.polluted]
    assert abs(len(polluted) / len(items) - 0.5) < 0.04
    text_swaps = 0
    for i, it in enumerate(items):
        own = examples[i % n_images]
        assert it.image == (0, own.image_key) and it.regions is regions[own.image_key]
        if not it.polluted:
            assert it.text == own.text and it.tags == own.tags
            continue
        swapped_text, swapped_tags = it.text_image != it.image, it.tags_image != it.image
        assert swapped_text != swapped_tags  # exactly one of the two is replaced
        if swapped_text:  # the text really is another image's
            text_swaps += 1
            assert it.text == examples[it.text_image[1]].text and it.text != own.text and it.tags == own.tags
        else:
            assert it.tags == examples[it.tags_image[1]].tags and set(it.tags) - set(own.tags) and it.text == own.text
    assert abs(text_swaps / len(polluted) - 0.5) < 0.06
    batch = PretrainCollator(tok, TINY)(items[:32], g)
    assert batch.itm_labels.tolist() == [it.polluted for it in items[:32]]
    # A question names what it asks about, present or not: VQA text is MLM-only unless asked otherwise.
    questions = [dataclasses.replace(e, kind="vqa") for e in examples]
    ds_q = PretrainDataset(questions, [regions])
    assert {ds_q.item(i % n_images, g).polluted for i in range(200)} == {IGNORE}
    ds_q = PretrainDataset(questions, [regions], PretrainTaskConfig(itm_on_questions=True))
    assert {ds_q.item(i % n_images, g).polluted for i in range(200)} == {0, 1}


# ---------------------------------------------------------------------------------------------- corpus


def test_corpus_tag_sources(world, tmp_path):
    root, store_root = world
    w, store = World(root), FeatureStore(store_root)
    gt, skipped = build_corpus(w, "train", store, tag_source="gt")
    assert skipped == 0 and len(gt) == 24 * 3  # two captions and one question per image
    inst = w.instances("train")
    ex = next(e for e in gt if e.kind == "vqa")
    assert ex.text.startswith("what colour is the") and ex.text.split()[-1] in COLOURS
    names = {CLASSES[a.category_id - 1] for a in inst.annotations[ex.image_key]}
    assert set(ex.tags) == names and len(ex.tags) == len(names)
    from_store, _ = build_corpus(w, "train", store, tag_source="store")
    assert all(set(e.tags) == set(store[e.image_key].tags) for e in from_store)
    assert all(e.tags == [] for e in build_corpus(w, "train", store, tag_source="none")[0])
    only_captions, _ = build_corpus(w, "train", store, tag_source="none", use_vqa=False)
    assert len(only_captions) == 48 and {e.kind for e in only_captions} == {"caption"}
    # pseudo-captions over a store's images, tags from that store; images without features are skipped
    pseudo = tmp_path / "pseudo.json"
    pseudo.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.png", "width": 200, "height": 100},
                                             {"id": 999, "file_name": "x.png", "width": 9, "height": 9}],
                                  "annotations": [{"id": 1, "image_id": 1, "caption": "a teacher's caption"},
                                                  {"id": 2, "image_id": 999, "caption": "no features"}]}))
    extra, missing = pseudo_caption_corpus(pseudo, store)
    assert missing == 1 and [(e.text, e.source, e.kind) for e in extra] == [("a teacher's caption", 1, "pseudo")]
    assert extra[0].tags == list(dict.fromkeys(store[1].tags))


# ---------------------------------------------------------------------------------------------- model


def test_model_losses_and_eval(world, tok):
    root, store_root = world
    store = FeatureStore(store_root)
    examples, _ = build_corpus(World(root), "val", store, tag_source="gt")
    ds, collate = PretrainDataset(examples, [store]), PretrainCollator(tok, TINY)
    torch.manual_seed(0)
    model = PretrainModel(TINY)
    batches = fixed_batches(ds, collate, 8, 20)
    assert sum(len(b) for b in batches) == 20
    assert torch.equal(fixed_batches(ds, collate, 8, 20)[0].input_ids, batches[0].input_ids)  # seeded
    out = model(batches[0])
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and 0 <= out["mlm_acc"] <= 1 and 0 <= out["itm_acc"] <= 1
    assert model.bert.layers[0].query.weight.grad is not None and model.itm.classifier.weight.grad is not None
    model.itm_weight = 5.0  # --itm-weight: loss = MLM + w * ITM
    weighted = model(batches[0])
    assert torch.allclose(weighted["loss"], weighted["mlm_loss"] + 5.0 * weighted["itm_loss"])
    model.itm_weight = 1.0
    # an untrained model: MLM loss near ln(vocab), ITM near ln 2
    result = evaluate(model, batches)
    assert abs(result["mlm_loss"] - torch.log(torch.tensor(30522.0))) < 1.0
    judged = sum(int((b.itm_labels != IGNORE).sum()) for b in batches)
    assert abs(result["itm_loss"] - 0.693) < 0.2 and result["itm_pairs"] == judged
    assert 0 < judged < 20  # the val corpus's VQA question + answer texts are not judged in ITM


def test_pretrain_command_learns_resumes_and_saves(world, tmp_path, capsys):
    root, store_root = world
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(root), "--features", str(store_root), "--out", str(out), "--preset",
            "bert-demo", "--tags", "gt", "--batch-size", "8", "--epochs", "20", "--lr", "1e-3", "--log-every", "2",
            "--ckpt-every", "4", "--eval-every", "4", "--eval-examples", "16", "--dropout", "0", "--max-steps", "8"]
    assert cli_main(args) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [e for e in log if "loss" in e]
    evals = [e for e in log if "eval" in e]
    assert train[-1]["step"] == 8 and {"mlm_acc", "itm_acc", "mlm_loss", "itm_loss", "lr"} <= set(train[-1])
    assert train[-1]["mlm_loss"] < train[0]["mlm_loss"] - 1.0  # it learns
    assert evals and {"mlm_acc", "itm_acc", "itm_swap_acc"} <= set(evals[-1]["eval"])
    # resume: 4 more steps continue from the checkpoint at step 8
    assert cli_main(args[:-1] + ["12"]) == 0
    log2 = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log2 if "loss" in e] == [2, 4, 6, 8, 10, 12]
    printed = capsys.readouterr()
    assert "resumed" in printed.out + printed.err
    # the model folder loads back into a fresh model and gives the same held-out numbers
    folder = out / "model"
    cfg = checkpoint.read(folder, "pretrain").bert_config()
    assert cfg.name == "bert-demo" and cfg.region_dim == DIM and cfg.dropout == 0
    model = PretrainModel(cfg)
    report = load_text_weights(model, folder)
    assert not report.missing and not report.mismatched
    result = json.loads((out / "result.json").read_text())
    store = FeatureStore(store_root)
    val, _ = build_corpus(World(root), "val", store, tag_source="gt")
    batches = fixed_batches(PretrainDataset(val, [store]), PretrainCollator(get_tokenizer(), cfg), 8, 16, seed=1234)
    assert abs(evaluate(model, batches)["mlm_acc"] - result["eval"]["mlm_acc"]) < 1e-6
    # and the same score on the held-out captions against their one-word swaps (the store's class names)
    families = word_families(World(root), "train", store)
    assert families is not None and tuple(CLASSES) in families.families
    swaps = swap_batches(PretrainDataset(val, [store], families=families), PretrainCollator(get_tokenizer(), cfg), 8,
                         8, seed=4321)
    assert sum(len(b) for b in swaps) == 16
    assert abs(evaluate(model, swaps)["itm_acc"] - result["eval"]["itm_swap_acc"]) < 1e-6


def test_pretrain_on_the_fly_from_image_files(tmp_path):
    # `--detector` instead of `--features`: regions come from running the detector on the world's images,
    # and they are the very regions `minivlm extract` would have stored.

    from minivlm.config import get_tee
    from minivlm.data.synthetic import generate_world
    from minivlm.vision.extract import OnTheFlyRegions, world_sources
    from minivlm.vision.tee import TEE, save_detector

    generate_world(tmp_path / "w", images=12, seed=0, workers=1)
    w = World(tmp_path / "w")
    cfg = dataclasses.replace(get_tee("tee-demo"), image_size=128, fpn_channels=16, fpn_layers=1,
                              rpn_pre_nms_topk=100, rpn_post_nms_topk=20, max_regions=6, region_dim=16)
    torch.manual_seed(0)
    detector = TEE(cfg, w.class_names(), w.attribute_names())
    save_detector(detector, tmp_path / "det")
    out = tmp_path / "run"
    assert cli_main(["pretrain", "--data", str(tmp_path / "w"), "--detector", str(tmp_path / "det"), "--out", str(out),
                     "--preset", "bert-demo", "--tags", "store", "--batch-size", "4", "--max-steps", "2",
                     "--eval-examples", "4"]) == 0
    assert [e["step"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e][-1] == 2
    assert checkpoint.read(out / "model", "pretrain").bert_config().region_dim == 16
    iid, path = world_sources(tmp_path / "w")[0]
    fly = OnTheFlyRegions(detector, world_sources(tmp_path / "w"))
    assert iid in fly and -1 not in fly
    direct = detector.extract([path])[0]
    assert torch.equal(fly[iid].boxes, direct.boxes) and fly[iid].tags == direct.tags
    assert torch.allclose(fly[iid].features.float(), direct.features, atol=1e-2)


def test_corpus_caps_question_texts_per_image(tmp_path):
    """--vqa-per-image keeps a question-rich world from crowding captions out of the pre-training corpus."""
    from minivlm.data.synthetic import generate_world
    from minivlm.errors import MiniVLMError

    generate_world(tmp_path / "w", images=8, seed=3, nlvr2_pairs=0, questions_per_image=8, workers=1)
    w = World(tmp_path / "w")
    everything, capped = split_texts(w, "train"), split_texts(w, "train", vqa_per_image=3)
    questions = [t for t in everything if t[2] == "vqa"]
    kept = [t for t in capped if t[2] == "vqa"]
    assert [t for t in capped if t[2] == "caption"] == [t for t in everything if t[2] == "caption"]
    per_image = {iid: [t for t in questions if t[0] == iid] for iid in {t[0] for t in questions}}
    assert max(len(v) for v in per_image.values()) == 8
    assert sorted(kept) == sorted(t for v in per_image.values() for t in v[:3])  # the first three of each
    assert split_texts(w, "train", vqa_per_image=0) == split_texts(w, "train", use_vqa=False)
    with pytest.raises(MiniVLMError, match="vqa-per-image"):
        split_texts(w, "train", vqa_per_image=-1)
