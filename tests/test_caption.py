"""Captioning: masked fine-tuning, prefix-causal mask, cached vs recomputed decoding, beam search, SCST."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from minivlm.config import BertConfig, CaptionTaskConfig, TrainConfig, to_dict
from minivlm.data.world import World
from minivlm.errors import MiniVLMError
from minivlm import checkpoint
from minivlm.fusion.loading import canonical_state_dict
from minivlm.fusion.transformer import prefix_causal_mask
from minivlm.io import save_weights, write_json
from minivlm.regions import Regions
from minivlm.tasks.caption_data import CaptionDataset, mask_captions, output_vocabulary
from minivlm.tasks.caption_model import IGNORE, OUTSIDE_VOCAB_BIAS, CachedSteps, CaptionModel, FullSteps, build_prefix, predict_captions
from minivlm.tasks.caption_train import ScstObjective, train_caption
from minivlm.tasks.decode import SpecialIds, greedy_search
from minivlm.text.tokenizer import Tokenizer

WORDS = ("a an the red green blue cube ball balls dog car sleeping two on near table grass street box "
         "small big one three sky tree cat person riding horse water").split()
CAPTIONS = ["a red cube", "two green balls", "a sleeping dog", "the blue car"]
TAGS = [["cube", "table"], ["ball", "box"], ["dog", "grass"], ["car", "street"]]



@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    # A small vocabulary keeps the decoder (and each test) small; the code paths are the same as BERT's.
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]) + "\n")
    return Tokenizer(path)


def tiny_cfg(tok: Tokenizer) -> BertConfig:
    return BertConfig("tiny", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                      vocab_size=tok.vocab_size, dropout=0.0, region_dim=32, max_regions=6, max_text_len=16,
                      max_tag_len=8)


def regions(k: int, seed: int, tags: list[str] | None = None, dim: int = 32) -> Regions:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * 50
    wh = torch.rand(k, 2, generator=g) * 50 + 1
    tags = tags if tags is not None else []
    return Regions(boxes=torch.cat([xy, xy + wh], 1), features=torch.randn(k, dim, generator=g),
                   scores=torch.rand(k, generator=g), labels=torch.zeros(k, dtype=torch.long), image_size=(100, 100),
                   tags=[tags[i % len(tags)] for i in range(k)] if tags else [])


def new_model(tok: Tokenizer, seed: int = 0) -> CaptionModel:
    torch.manual_seed(seed)
    return CaptionModel(tiny_cfg(tok), SpecialIds.from_tokenizer(tok)).eval()


@pytest.fixture(scope="module")
def image_regions() -> dict[int, Regions]:
    return {i: regions(4, 10 + i, TAGS[i]) for i in range(4)}


@pytest.fixture(scope="module")
def trained(tok, image_regions):
    """A tiny model overfit on 4 (regions, caption) pairs: (model, losses)."""
    model = new_model(tok).train()
    ds = CaptionDataset(list(enumerate(CAPTIONS)), image_regions, tok, model.cfg, CaptionTaskConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        out = model(ds.collate([ds[i] for i in range(4)], generator=g))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    return model.eval(), losses


def mixed_prefix(tok, cfg):
    """Images with different tag and region counts, one without tags and one without regions."""
    rl = [regions(5, 1, ["dog", "cat", "dog", "tree"]), regions(3, 2, ["car"]), regions(6, 3), regions(0, 4, [])]
    return build_prefix(tok, rl, cfg)


# ---------------------------------------------------------------------------------------------- inputs


def test_tags_are_deduplicated_in_score_order(tok):
    r = regions(4, 0, ["dog", "cat", "dog", "tree"])
    r.scores = torch.tensor([0.5, 0.9, 0.8, 0.1])
    assert r.object_tags(10) == ["cat", "dog", "tree"]
    assert r.object_tags(2) == ["cat", "dog"]  # only the regions the transformer sees
    assert r.object_tags(10, min_score=0.5) == ["cat", "dog"]  # unsure regions name no tag
    cfg = tiny_cfg(tok)
    prefix = build_prefix(tok, [r, regions(2, 1)], cfg)
    assert tok.decode(prefix.tag_ids[0][prefix.tag_mask[0]].tolist()) == "cat dog"  # tree: below tag_min_score
    assert prefix.tag_ids[0, 2] == tok.sep_id and not prefix.tag_mask[1].any()
    assert not build_prefix(tok, [r], cfg, tags="none").tag_mask.any()


def test_masking_rate_and_at_least_one_per_caption(tok):
    g = torch.Generator().manual_seed(0)
    n, s = 2000, 22
    lengths = torch.randint(3, s + 1, (n,), generator=g)
    valid = torch.arange(s)[None, :] < lengths[:, None]
    ids = torch.randint(5, tok.vocab_size, (n, s), generator=g).masked_fill(~valid, tok.pad_id)
    ids[:, 0] = tok.cls_id
    masked, labels = mask_captions(ids, valid, 0.15, tok.mask_id, generator=g)
    chosen = labels != IGNORE
    assert chosen.any(dim=1).all()
    assert not chosen[:, 0].any() and not (chosen & ~valid).any()  # never [CLS], never pads
    assert torch.equal(labels[chosen], ids[chosen]) and (masked[chosen] == tok.mask_id).all()
    assert torch.equal(masked[~chosen], ids[~chosen])
    long_rows = lengths >= 15  # the at-least-one rule barely moves the rate of long captions
    rate = chosen[long_rows].sum() / (valid[long_rows].sum() - long_rows.sum())
    assert 0.135 < float(rate) < 0.17
    short = torch.tensor([[tok.cls_id, tok.sep_id]])
    _, lab = mask_captions(short, torch.ones_like(short, dtype=torch.bool), 0.15, tok.mask_id)
    assert lab.tolist() == [[IGNORE, tok.sep_id]]  # an empty caption still predicts its [SEP]


def test_training_mask_is_prefix_causal(tok, image_regions):
    model = new_model(tok)
    ds = CaptionDataset([(0, "a red cube on the table near a dog")], image_regions, tok, model.cfg)
    batch = ds.collate([ds[0]])
    s = batch.input_ids.shape[1]
    pos = torch.arange(s).expand(1, s)

    def hidden(ids, prefix=batch.prefix):
        return model.encode(ids, pos, prefix_causal_mask(batch.caption_mask, prefix.valid()), prefix)

    ids = batch.input_ids.clone()
    ids[0, 3] = tok.mask_id
    base = hidden(ids)
    later = ids.clone()
    later[0, 4:s - 1] = tok.encode("sky")[0]
    changed = hidden(later)
    assert torch.allclose(changed[0, :4], base[0, :4], atol=1e-6)  # nothing before a changed token moves
    assert not torch.allclose(changed[0, 4:], base[0, 4:], atol=1e-3)
    earlier = ids.clone()
    earlier[0, 1] = tok.encode("sky")[0]
    assert not torch.allclose(hidden(earlier)[0, 3], base[0, 3], atol=1e-3)  # ... but earlier tokens are seen
    other = build_prefix(tok, [image_regions[1]], model.cfg)
    assert not torch.allclose(hidden(ids, other)[0, 1], base[0, 1], atol=1e-3)  # tags and regions are seen
    # the loss comes from the masked positions only: with only position 3 masked, a later (unmasked) token's
    # own target cannot move it, though a loss over every position would; the masked target does move it
    model.eval()  # no dropout: equal inputs give equal losses
    one = dataclasses.replace(batch, input_ids=ids, labels=torch.full_like(ids, IGNORE))
    one.labels[0, 3] = tok.encode("a red cube on the table near a dog")[2]  # "cube", what [MASK] at 3 hides
    out = model(one)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"]) and 0.0 <= float(out["acc"]) <= 1.0
    changed_later = dataclasses.replace(one, input_ids=later)
    assert torch.allclose(model(changed_later)["loss"], out["loss"], atol=1e-6)
    other_target = dataclasses.replace(one, labels=one.labels.clone())
    other_target.labels[0, 3] = tok.encode("sky")[0]
    assert not torch.allclose(model(other_target)["loss"], out["loss"], atol=1e-3)


# ---------------------------------------------------------------------------------------------- decoding


def test_cached_steps_give_the_recomputed_logits(tok):
    model = new_model(tok, seed=4)
    prefix = mixed_prefix(tok, model.cfg)
    n, expand = len(prefix), 2
    cached, full = CachedSteps(model, prefix, expand), FullSteps(model, prefix, expand)
    g = torch.Generator().manual_seed(0)
    tokens = torch.full((n * expand, 1), tok.cls_id)
    with torch.no_grad():
        for step in range(1, 9):
            a, b = cached(tokens), full(tokens)
            assert a.shape == (n * expand, tok.vocab_size)
            assert torch.allclose(a, b, atol=1e-5), f"step {step}: max diff {(a - b).abs().max():.2e}"
            tokens = torch.cat([tokens, torch.randint(5, tok.vocab_size, (n * expand, 1), generator=g)], 1)
            if step in (3, 6):  # beams reshuffle within an image, as beam search does
                rows = torch.tensor([i * expand + j for i in range(n) for j in (1, 1)] if step == 3 else
                                    [i * expand + j for i in range(n) for j in (1, 0)])
                tokens = tokens[rows]
                cached.reorder(rows)
                full.reorder(rows)


def test_cached_greedy_equals_recompute(tok, trained, image_regions):
    model = new_model(tok, seed=1)
    prefix = mixed_prefix(tok, model.cfg)
    fast = model.generate(prefix, max_len=12)
    slow = model.generate(prefix, max_len=12, use_cache=False)
    assert fast == slow
    full = model.generate(prefix, max_len=12, min_len=12)  # every row runs all 12 steps
    assert full == model.generate(prefix, max_len=12, min_len=12, use_cache=False)
    assert all(len(x) == 12 for x in full)
    trained_model = trained[0]
    prefix = build_prefix(tok, [image_regions[i] for i in range(4)] + [regions(5, 99, ["sky"])], model.cfg)
    fast = trained_model.generate(prefix, max_len=10)
    assert fast == trained_model.generate(prefix, max_len=10, use_cache=False)
    assert any(len(x) < 10 for x in fast)  # rows that stopped at [SEP] at different steps


def test_cached_beam_equals_recompute(tok, trained, image_regions):
    model = new_model(tok, seed=2)
    prefix = mixed_prefix(tok, model.cfg)
    assert model.generate(prefix, max_len=8, beam_size=3) == model.generate(prefix, max_len=8, beam_size=3,
                                                                             use_cache=False)
    trained_model = trained[0]
    prefix = build_prefix(tok, [image_regions[i] for i in range(4)] + [regions(5, 98, ["tree"])], model.cfg)
    for length_penalty in (1.0, 0.0):
        fast = trained_model.generate(prefix, max_len=10, beam_size=4, length_penalty=length_penalty)
        slow = trained_model.generate(prefix, max_len=10, beam_size=4, length_penalty=length_penalty, use_cache=False)
        assert fast == slow


def test_beam_one_is_greedy_and_min_len(tok, trained, image_regions):
    for model in (new_model(tok, seed=3), trained[0]):
        prefix = build_prefix(tok, [image_regions[i] for i in range(4)], model.cfg)
        assert model.generate(prefix, max_len=10, beam_size=1) == model.generate(prefix, max_len=10)
    model = trained[0]
    forced = model.generate(prefix, max_len=7, min_len=7)
    assert all(len(x) == 7 for x in forced)
    with pytest.raises(MiniVLMError, match="max_text_len"):
        model.generate(prefix, max_len=model.cfg.max_text_len)


def test_sequence_logprobs_reproduce_the_decoder(tok, trained, image_regions):
    model = trained[0]
    prefix = build_prefix(tok, [image_regions[i] for i in range(4)] + [regions(3, 7)], model.cfg)
    tokens, logp = greedy_search(CachedSteps(model, prefix), len(prefix), 10, model.ids, torch.device("cpu"))
    with torch.no_grad():
        again, valid = model.sequence_logprobs(prefix, tokens)
    assert torch.allclose(again, logp, atol=1e-4)
    assert torch.equal(valid, (tokens != tok.pad_id))


def test_every_token_objective_is_the_decoders_likelihood(tok, trained, image_regions):
    """The every-token loss is the mean negative log-likelihood the decoder gives the reference caption
    (so its optimum is the decoder's), over every token up to [SEP] and nothing after."""
    model = trained[0]
    ds = CaptionDataset(list(enumerate(CAPTIONS)), image_regions, tok, model.cfg,
                        CaptionTaskConfig(objective="every-token"))
    batch = ds.collate([ds[i] for i in range(4)])
    assert torch.equal(batch.input_ids[:, 0], torch.full((4,), tok.cls_id))  # clean: nothing masked
    assert tok.mask_id not in batch.input_ids
    with torch.no_grad():
        loss = model(batch)["loss"]
        logp, valid = model.sequence_logprobs(batch.prefix, batch.input_ids[:, 1:])
    assert valid.sum(1).tolist() == [len(tok.encode(c)) + 1 for c in CAPTIONS]  # the words and [SEP]
    assert torch.allclose(loss, -logp.sum() / valid.sum(), atol=1e-5)
    with pytest.raises(MiniVLMError, match="objective"):
        CaptionDataset([], image_regions, tok, model.cfg, CaptionTaskConfig(objective="nope"))


@pytest.mark.parametrize("restricted", [False, True])
def test_every_token_objective_trains_the_decoder(tok, image_regions, restricted):
    model = new_model(tok, seed=1).train()
    ds = CaptionDataset(list(enumerate(CAPTIONS)), image_regions, tok, model.cfg,
                        CaptionTaskConfig(objective="every-token"))
    if restricted:  # output_vocab="train"
        model.restrict_output(output_vocabulary(ds))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(40):
        out = model(ds.collate([ds[i] for i in range(4)]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["acc"]) == 1.0
    assert model.caption(tok, [image_regions[i] for i in range(4)]) == CAPTIONS
    if restricted:  # whatever the regions, nothing outside the training captions' words comes out
        words = {w for c in CAPTIONS for w in c.split()}
        odd = [regions(5, 100 + i, ["sky", "tree"]) for i in range(6)]
        assert all(set(c.split()) <= words for c in model.caption(tok, odd))


@pytest.mark.parametrize("objective", ["masked", "every-token"])
def test_restricted_output_vocabulary_is_the_full_softmax_with_the_rest_shut(tok, image_regions, objective):
    """output_vocab="train": training scores only the training captions' word pieces, and the loss equals
    the full-width decoder's (whose other rows get a -1e4 bias), so inference and ONNX need no change."""
    model = new_model(tok, seed=2).train()
    ds = CaptionDataset(list(enumerate(CAPTIONS)), image_regions, tok, model.cfg, CaptionTaskConfig(objective=objective))
    allowed = output_vocabulary(ds)
    words = {w for c in CAPTIONS for w in c.split()}
    assert sorted(tok.id_to_token(i) for i in allowed.tolist()) == sorted(words | {"[SEP]"})
    model.restrict_output(allowed)
    bias = model.mlm.decoder.bias.detach()
    shut = torch.ones(tok.vocab_size, dtype=torch.bool)
    shut[allowed] = False
    assert torch.all(bias[shut] == OUTSIDE_VOCAB_BIAS) and torch.all(bias[~shut] != OUTSIDE_VOCAB_BIAS)

    batch = ds.collate([ds[i] for i in range(4)], generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    restricted = model(batch)
    ids, model.output_ids = model.output_ids, None
    torch.manual_seed(0)
    full = model(batch)
    assert torch.allclose(restricted["loss"], full["loss"], atol=1e-5)
    assert float(restricted["acc"]) == float(full["acc"])

    model.output_ids = ids
    model.zero_grad()
    restricted["loss"].backward()
    assert torch.count_nonzero(model.mlm.decoder.weight.grad[shut]) == 0  # the shut rows are not trained
    assert torch.count_nonzero(model.mlm.decoder.weight.grad[~shut]) > 0

    bad = CaptionDataset([(0, "a big cat")], image_regions, tok, model.cfg,
                         CaptionTaskConfig(objective=objective, mask_prob=1.0))
    with pytest.raises(MiniVLMError, match="outside the caption output vocabulary"):
        model(bad.collate([bad[0]], generator=torch.Generator().manual_seed(0)))
    with pytest.raises(MiniVLMError, match="output vocabulary"):
        model.restrict_output(torch.tensor([tok.vocab_size]))
    with pytest.raises(MiniVLMError, match="output vocabulary must be one of"):
        train_caption(None, None, None, "unused", model.cfg, TrainConfig(), task_cfg=CaptionTaskConfig(output_vocab="nope"))


# ---------------------------------------------------------------------------------------------- training


def test_overfit_four_pairs(tok, trained, image_regions):
    model, losses = trained
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:5])
    got = model.caption(tok, [image_regions[i] for i in range(4)])
    assert got == CAPTIONS
    assert model.caption(tok, [image_regions[i] for i in range(4)], beam_size=3) == CAPTIONS


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_scst_advantage_sign(tok, trained, image_regions, sign):
    model = copy.deepcopy(trained[0])
    k, b = 3, 4

    def reward(keys, captions):  # samples get `sign`, the greedy baseline 0: every advantage is `sign`
        return np.full(len(keys), sign if len(keys) == b * k else 0.0)

    model.scst = ScstObjective(reward, tok, samples=k, baseline="greedy", max_len=8)
    ds = CaptionDataset(list(enumerate(CAPTIONS)), image_regions, tok, model.cfg)
    batch = ds.collate([ds[i] for i in range(4)])
    model.train()
    out = model(batch)
    assert torch.allclose(out["advantage"], torch.full((b * k,), sign))
    samples = out["samples"]
    prefix = batch.prefix.repeat(k)
    with torch.no_grad():
        before = model.sequence_logprobs(prefix, samples)[0].sum()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    with torch.no_grad():
        after = model.sequence_logprobs(prefix, samples)[0].sum()
    assert (after - before) * sign > 0


def test_scst_mean_baseline_is_leave_one_out(tok, trained, image_regions):
    model = copy.deepcopy(trained[0])
    rng, given = np.random.default_rng(0), []

    def reward(keys, caps):
        given.append(rng.random(len(keys)))
        return given[-1]

    model.scst = ScstObjective(reward, tok, samples=4, baseline="mean", max_len=6)
    ds = CaptionDataset(list(enumerate(CAPTIONS)), image_regions, tok, model.cfg)
    out = model(ds.collate([ds[i] for i in range(4)]))
    adv = out["advantage"].view(4, 4)
    r = torch.as_tensor(np.concatenate(given), dtype=adv.dtype).view(4, 4)  # [image, sample]
    # each sample against the mean of the image's *other* samples (a plain mean would also sum to zero)
    assert torch.allclose(adv, r - (r.sum(1, keepdim=True) - r) / 3, atol=1e-6) and adv.abs().sum() > 0
    out["loss"].backward()
    assert model.bert.layers[0].query.weight.grad is not None
    with pytest.raises(MiniVLMError):
        ScstObjective(lambda k, c: None, tok, samples=1, baseline="mean")


def test_results_rows(tok, trained, image_regions):
    rows = predict_captions(trained[0], tok, [3, 1, 0], image_regions, batch_size=2, progress=False)
    assert [r["image_id"] for r in rows] == [3, 1, 0]
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in rows)
    assert [r["caption"] for r in rows] == [CAPTIONS[3], CAPTIONS[1], CAPTIONS[0]]
    assert json.loads(json.dumps(rows)) == rows


# ---------------------------------------------------------------------------------------------- loading / stages


def write_world(root, images: dict[str, dict[int, list[str]]]) -> World:
    for split, caps in images.items():
        write_json(root / "annotations" / f"captions_{split}.json", {
            "images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in caps],
            "annotations": [{"id": i * 10 + j, "image_id": i, "caption": c}
                            for i, cs in caps.items() for j, c in enumerate(cs)]})
    return World(root)


class DictStore(dict):
    """Regions by exact key; a FeatureStore's `find` also tries the key's other spellings."""

    def find(self, key):
        return key if key in self else None


def test_train_caption_ce_then_scst_and_reload(tok, tmp_path, image_regions):
    store = DictStore({i + 1: image_regions[i] for i in range(4)})
    store[5] = regions(4, 50, ["sky"])
    world = write_world(tmp_path / "world", {
        "train": {i + 1: [CAPTIONS[i], CAPTIONS[i].replace("a ", "one ")] for i in range(4)},
        "val": {5: ["the blue sky"], 77: ["not in the store"]}})
    cfg = tiny_cfg(tok)
    ce = TrainConfig(epochs=2, max_steps=4, batch_size=4, lr=5e-3, log_every=2, amp=False)
    scst = TrainConfig(max_steps=2, batch_size=2, lr=1e-4, log_every=1, amp=False)
    model = train_caption(None, world, store, tmp_path / "run", cfg, ce, scst, tokenizer=tok,
                          task_cfg=CaptionTaskConfig(max_gen_len=6, scst_samples=2, output_vocab="train"),
                          val_images=5)
    assert model.scst is None
    allowed = {i for c in CAPTIONS for i in tok.encode(c + " one")} | {tok.sep_id}
    assert set(model.output_ids.tolist()) == allowed
    ce_log = [json.loads(x) for x in (tmp_path / "run" / "ce" / "log.jsonl").read_text().splitlines()]
    scst_log = [json.loads(x) for x in (tmp_path / "run" / "scst" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in ce_log if "loss" in e] == [2, 4]
    assert any("cider_d" in e.get("eval", {}) for e in ce_log)
    assert all("reward" in e and "baseline_reward" in e for e in scst_log if "loss" in e)
    # the caller (finetune) writes the task folder once; train_caption leaves no model folder of its own
    assert not (tmp_path / "run" / "model").exists()
    checkpoint.write(tmp_path / "run", "task", checkpoint.TaskSpec("caption", model.cfg).to_json(), model.state_dict(),
                     vocab=tok.vocab_path)
    again = CaptionModel.from_pretrained_vl(tmp_path / "run")
    assert again.ids == model.ids and not again.load_report.missing
    prefix = build_prefix(tok, [image_regions[0]], cfg)
    model.eval()
    assert again.generate(prefix, max_len=6) == model.generate(prefix, max_len=6)
    # the restriction travels in the weights: a reloaded model (no output_ids) still emits only those words
    assert again.output_ids is None
    shut = torch.ones(tok.vocab_size, dtype=torch.bool)
    shut[sorted(allowed)] = False
    assert torch.all(again.mlm.decoder.bias[shut] < -9000)
    assert set(sum(again.generate(build_prefix(tok, [regions(4, s, ["sky"]) for s in range(5)], cfg), max_len=6), [])) <= allowed


def test_from_pretrained_vl_loads_bert_and_mlm(tok, tmp_path):
    cfg = tiny_cfg(tok)
    torch.manual_seed(5)
    from minivlm.tasks.pretrain import PretrainModel

    pre = PretrainModel(cfg)
    # a pre-training folder ...
    checkpoint.write(tmp_path / "pre", "pretrain", {"bert": to_dict(cfg)}, pre.state_dict(), vocab=tok.vocab_path)
    # ... and a caption task folder
    task = CaptionModel(cfg, SpecialIds.from_tokenizer(tok))
    task.load_state_dict(pre.state_dict(), strict=False)
    checkpoint.write(tmp_path / "task", "task", checkpoint.TaskSpec("caption", cfg).to_json(), task.state_dict())
    for folder in ("pre", "task"):
        model = CaptionModel.from_pretrained_vl(tmp_path / folder, SpecialIds.from_tokenizer(tok))
        assert not model.load_report.missing
        assert bool(model.load_report.unused) == (folder == "pre")  # the ITM head is not needed
        assert torch.equal(model.mlm.decoder.weight, pre.mlm.decoder.weight)
        assert torch.equal(model.bert.layers[1].ffn_in.weight, pre.bert.layers[1].ffn_in.weight)
    # a text-only Hugging Face checkpoint leaves the region projection random, and says so
    hf = {k: v for k, v in canonical_state_dict(pre).items() if k.startswith(("bert.embeddings", "bert.encoder", "cls.pred"))}
    save_weights(hf, tmp_path / "part" / "model.safetensors")
    write_json(tmp_path / "part" / "config.json", {
        "model_type": "bert", "num_hidden_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_heads, "vocab_size": cfg.vocab_size})
    model = CaptionModel.from_pretrained_vl(tmp_path / "part", SpecialIds.from_tokenizer(tok))
    assert sorted(model.load_report.missing) == sorted(k for k in model.state_dict() if "region" in k)
