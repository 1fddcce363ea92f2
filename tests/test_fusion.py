"""The multi-modal transformer: OSCAR inputs, masks, KV cache, Table 2 cost rows, text-weight loading."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from minivlm.config import BertConfig, get_bert
from minivlm.errors import MiniVLMError
from minivlm.fusion.cost import TABLE2_PRESETS, fusion_cost_rows
from minivlm.fusion.heads import ITMHead, MLMHead
from minivlm.fusion.inputs import build_batch
from minivlm.fusion.layout import TAG_SEGMENT, TEXT_SEGMENT
from minivlm import checkpoint
from minivlm.fusion.loading import load_text_weights, read_hf_checkpoint
from minivlm.fusion.transformer import MultimodalBert, prefix_causal_mask, trim_cache
from minivlm.regions import Regions
from minivlm.text.tokenizer import get_tokenizer, minilm_checkpoint_path

TINY = BertConfig("tiny", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, vocab_size=30522,
                  dropout=0.0, region_dim=32, max_regions=5, max_text_len=10, max_tag_len=6)


def random_regions(k: int, dim: int, size=(200, 100), seed: int = 0, tags=None) -> Regions:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * torch.tensor([size[0] / 2, size[1] / 2])
    wh = torch.rand(k, 2, generator=g) * torch.tensor([size[0] / 2, size[1] / 2]) + 1
    return Regions(boxes=torch.cat([xy, xy + wh], 1), features=torch.randn(k, dim, generator=g),
                   scores=torch.rand(k, generator=g), labels=torch.zeros(k, dtype=torch.long), image_size=size,
                   tags=tags if tags is not None else ["dog"] * k)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


# ---------------------------------------------------------------------------------------------- inputs


def test_segments_positions_and_specials(tok):
    regions = [random_regions(3, TINY.region_dim), random_regions(2, TINY.region_dim, seed=1)]
    batch = build_batch(tok, ["a dog on grass", ""], [["dog", "grass"], ["cat"]], regions, TINY)
    ids, seg = batch.input_ids, batch.token_type_ids
    text = tok.encode("a dog on grass")
    n0 = 1 + len(text) + 1
    assert ids[0, :n0].tolist() == [tok.cls_id, *text, tok.sep_id]
    assert ids[0, n0:].tolist() == [*tok.encode("dog grass"), tok.sep_id]
    assert seg[0, :n0].eq(TEXT_SEGMENT).all() and seg[0, n0:].eq(TAG_SEGMENT).all()
    # empty text: [CLS] [SEP] cat [SEP] [PAD]...
    assert ids[1, :4].tolist() == [tok.cls_id, tok.sep_id, *tok.encode("cat"), tok.sep_id]
    assert seg[1, :4].tolist() == [0, 0, 1, 1]
    assert ids[1, 4:].eq(tok.pad_id).all() and not batch.text_mask[1, 4:].any() and batch.text_mask[1, :4].all()
    # specials and pads are never maskable; every word piece is
    special = (ids == tok.cls_id) | (ids == tok.sep_id) | (ids == tok.pad_id)
    assert torch.equal(batch.maskable, ~special)
    assert batch.position_ids[0].tolist() == list(range(ids.shape[1]))
    assert batch.attention_mask().shape == (2, ids.shape[1] + 3)
    assert batch.region_mask.tolist() == [[True, True, True], [True, True, False]]


def test_truncation_and_no_tags(tok):
    long_text = " ".join(["horse"] * 50)
    batch = build_batch(tok, [long_text], [["dog"] * 40], [random_regions(2, TINY.region_dim)], TINY)
    seg = batch.token_type_ids[0]
    assert int((seg == TEXT_SEGMENT).sum()) == TINY.max_text_len
    assert int((seg == TAG_SEGMENT).sum()) == TINY.max_tag_len
    assert batch.input_ids[0, TINY.max_text_len - 1] == tok.sep_id and batch.input_ids[0, -1] == tok.sep_id
    none = build_batch(tok, ["a cat"], [[]], [random_regions(2, TINY.region_dim)], TINY)
    assert none.input_ids[0].tolist() == [tok.cls_id, *tok.encode("a cat"), tok.sep_id]
    assert none.token_type_ids.eq(TEXT_SEGMENT).all()


def test_regions_top_k_box_code_and_dim_check(tok):
    r = random_regions(8, TINY.region_dim)
    r.boxes[0] = torch.tensor([20.0, 10.0, 100.0, 60.0])  # image is 200 x 100
    r.scores[0] = 2.0  # the best region comes first
    batch = build_batch(tok, ["x"], None, [r], TINY)
    assert batch.region_feats.shape == (1, TINY.max_regions, TINY.region_dim)
    kept = torch.argsort(r.scores, descending=True)[: TINY.max_regions]
    assert torch.allclose(batch.region_feats[0], r.features[kept])
    assert torch.allclose(batch.region_boxes[0, 0], torch.tensor([0.1, 0.1, 0.5, 0.6, 0.4, 0.5]))
    # Predicted tags: each confident class name once (OSCAR's object tags), not one word per region.
    assert batch.input_ids[0, 3:].tolist() == [*tok.encode("dog"), tok.sep_id]
    with pytest.raises(MiniVLMError, match="region features"):
        build_batch(tok, ["x"], None, [random_regions(2, 7)], TINY)


# ---------------------------------------------------------------------------------------------- model


def test_padding_does_not_change_real_tokens(tok):
    torch.manual_seed(0)
    model = MultimodalBert(TINY).eval()
    r = random_regions(3, TINY.region_dim)
    alone = build_batch(tok, ["a dog"], [["dog"]], [r], TINY)
    padded = build_batch(tok, ["a dog", "a much longer sentence about a red dog"], [["dog"], ["dog", "cat"]],
                         [r, random_regions(5, TINY.region_dim, seed=3)], TINY)
    with torch.no_grad():
        h1 = model(**alone.model_inputs()).hidden_states
        h2 = model(**padded.model_inputs()).hidden_states
        mask3 = padded.attention_mask()[:, None, :]  # the [B, 1, Kv] form means the same
        h3 = model(**{**padded.model_inputs(), "attention_mask": mask3}).hidden_states
    t1, t2 = alone.input_ids.shape[1], padded.input_ids.shape[1]
    assert torch.allclose(h1[0, :t1], h2[0, :t1], atol=1e-5)  # text tokens
    assert torch.allclose(h1[0, t1:], h2[0, t2:t2 + 3], atol=1e-5)  # regions
    assert torch.equal(h2, h3)


def test_kv_cache_matches_full_recompute():
    torch.manual_seed(0)
    model, head = MultimodalBert(TINY).eval(), MLMHead(TINY).eval()
    b, c, g, r = 2, 6, 3, 4
    caption = torch.randint(1000, 2000, (b, c))
    tags = torch.randint(1000, 2000, (b, g))
    feats, boxes = torch.randn(b, r, TINY.region_dim), torch.rand(b, r, 6)
    region_valid = torch.tensor([[True] * r, [True, True, False, False]])
    prefix_valid = torch.cat([torch.ones(b, g, dtype=torch.bool), region_valid], 1)
    cap_pos, tag_pos = torch.arange(c).expand(b, c), torch.arange(c, c + g).expand(b, g)
    zeros, ones = torch.zeros(b, c, dtype=torch.long), torch.ones(b, g, dtype=torch.long)
    with torch.no_grad():
        full_mask = prefix_causal_mask(torch.ones(b, c, dtype=torch.bool), prefix_valid)
        full = model(input_ids=torch.cat([caption, tags], 1), token_type_ids=torch.cat([zeros, ones], 1),
                     position_ids=torch.cat([cap_pos, tag_pos], 1), region_feats=feats, region_boxes=boxes,
                     attention_mask=full_mask).hidden_states
        want = head(full[:, :c])
        out = model(input_ids=tags, token_type_ids=ones, position_ids=tag_pos, region_feats=feats,
                    region_boxes=boxes, attention_mask=prefix_valid, use_cache=True)
        cache, got = out.past_key_values, []
        assert len(cache) == TINY.num_layers and cache[0][0].shape == (b, TINY.num_heads, g + r, 16)
        for t in range(c):
            step_mask = torch.cat([prefix_valid, torch.ones(b, t + 1, dtype=torch.bool)], 1)[:, None]
            out = model(input_ids=caption[:, t:t + 1], token_type_ids=zeros[:, :1], position_ids=cap_pos[:, t:t + 1],
                        attention_mask=step_mask, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            got.append(head(out.hidden_states[:, -1]))
    got = torch.stack(got, 1)
    assert (got - want).abs().max() < 1e-4
    # the causal mask matters: a future token changes nothing before it, but changes its own position
    with torch.no_grad():
        other = caption.clone()
        other[:, -1] = 5
        full2 = model(input_ids=torch.cat([other, tags], 1), token_type_ids=torch.cat([zeros, ones], 1),
                      position_ids=torch.cat([cap_pos, tag_pos], 1), region_feats=feats, region_boxes=boxes,
                      attention_mask=full_mask).hidden_states
    assert torch.allclose(full2[:, : c - 1], full[:, : c - 1], atol=1e-5)
    assert not torch.allclose(full2[:, c - 1], full[:, c - 1], atol=1e-3)
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=caption[:, :1], past_key_values=cache)


def test_trailing_mask_then_trim_cache():
    torch.manual_seed(0)
    model = MultimodalBert(TINY).eval()
    b, r = 2, 3
    feats, boxes = torch.randn(b, r, TINY.region_dim), torch.rand(b, r, 6)
    prefix = model(region_feats=feats, region_boxes=boxes, use_cache=True).past_key_values
    zeros = torch.zeros(b, 2, dtype=torch.long)
    tok, mask_tok = torch.full((b, 1), 2000), torch.full((b, 1), 103)
    pos = torch.tensor([[0, 1]]).expand(b, 2)
    # two new tokens: the word sees the regions and itself, the [MASK] sees everything before it too
    two_mask = torch.ones(b, 2, r + 2, dtype=torch.bool)
    two_mask[:, 0, -1] = False
    with torch.no_grad():
        both = model(input_ids=torch.cat([tok, mask_tok], 1), token_type_ids=zeros, position_ids=pos,
                     attention_mask=two_mask, past_key_values=prefix, use_cache=True)
        alone = model(input_ids=tok, token_type_ids=zeros[:, :1], position_ids=pos[:, :1],
                      attention_mask=torch.ones(b, 1, r + 1, dtype=torch.bool), past_key_values=prefix, use_cache=True)
    trimmed = trim_cache(both.past_key_values, 1)
    assert trimmed[0][0].shape[2] == r + 1
    for (k1, v1), (k2, v2) in zip(trimmed, alone.past_key_values):
        assert torch.allclose(k1, k2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5)


def test_cost_rows_match_table2():
    rows = {r.model: r for r in fusion_cost_rows()}
    assert set(rows) == set(TABLE2_PRESETS)
    for name, row in rows.items():
        assert abs(row.params_m / row.paper_params_m - 1) < 0.03, (name, row.params_m, row.paper_params_m)
        assert abs(row.gflops / row.paper_gflops - 1) < 0.10, (name, row.gflops, row.paper_gflops)
    # MiniLM is the paper's 34% of BERT-base parameters and 28% of its FLOPs
    assert 0.32 < rows["minilm"].params_m / rows["bert-base"].params_m < 0.36
    assert 0.26 < rows["minilm"].gflops / rows["bert-base"].gflops < 0.30


# ---------------------------------------------------------------------------------------------- loading


def test_loaded_minilm_matches_transformers(tok):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import BertModel

    folder = minilm_checkpoint_path()
    cfg = checkpoint.read(folder, checkpoint.HF_BERT).bert_config()
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (6, 384, 1536)
    model = MultimodalBert(cfg).eval()
    report = load_text_weights(model, folder)
    assert report.layers_loaded == list(range(6)) and report.layers_random == [] and not report.mismatched
    assert all(n.startswith("region_embeddings.") for n in report.missing)
    hf = BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    batch = build_batch(tok, ["a dog runs on the grass", "two cats"], [["dog", "grass"], []],
                        [None, None], cfg)
    with torch.no_grad():
        ours = model(input_ids=batch.input_ids, token_type_ids=batch.token_type_ids,
                     attention_mask=batch.text_mask).hidden_states
        theirs = hf(input_ids=batch.input_ids, token_type_ids=batch.token_type_ids,
                    attention_mask=batch.text_mask.long()).last_hidden_state
    valid = batch.text_mask
    assert (ours[valid] - theirs[valid]).abs().max() <= 1e-4


def test_shallow_checkpoint_into_deeper_preset_reports_layers():
    folder = minilm_checkpoint_path()
    ckpt = read_hf_checkpoint(folder)
    cfg = dataclasses.replace(get_bert("minilm"), num_layers=8)  # 8 of MiniLM's 12 layers: fast enough
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"bert": MultimodalBert(cfg), "mlm": MLMHead(cfg), "itm": ITMHead(cfg)})
    report = load_text_weights(model, folder)
    assert report.checkpoint_layers == 6
    assert report.layers_loaded == [0, 1, 2, 3, 4, 5] and report.layers_random == [6, 7]
    assert "left random: 6-7" in report.summary()
    layer5 = model["bert"].layers[5].ffn_in.weight
    assert torch.equal(layer5, ckpt["bert.encoder.layer.5.intermediate.dense.weight"])
    assert "bert.layers.6.query.weight" in report.missing and "mlm.decoder.weight" in report.missing
    assert torch.equal(model["itm"].pooler.dense.weight, ckpt["bert.pooler.dense.weight"])
    # narrower positions: a clear mismatch, the rest still loads
    small = dataclasses.replace(get_bert("minilm"), num_layers=2, max_position=128)
    report = load_text_weights(MultimodalBert(small), folder)
    assert any("position_embeddings" in m and "[512, 384]" in m and "[128, 384]" in m for m in report.mismatched)
    assert report.layers_loaded == [0, 1] and any(k.startswith("bert.encoder.layer.5.") for k in report.unused)
    with pytest.raises(MiniVLMError, match="no tensor"):
        load_text_weights(MultimodalBert(TINY), folder)


def test_pretrain_folder_initialises_another_module_layout(tmp_path):
    from minivlm.config import to_dict
    from minivlm.tasks.pretrain import PretrainModel

    torch.manual_seed(0)
    pre = PretrainModel(TINY)
    checkpoint.write(tmp_path / "m", "pretrain", {"bert": to_dict(TINY)}, pre.state_dict())
    torch.manual_seed(1)  # the same parts under other module names: matched by type, not by name
    other = torch.nn.ModuleDict({"encoder": MultimodalBert(TINY), "lm": MLMHead(TINY), "match": ITMHead(TINY)})
    report = load_text_weights(other, tmp_path / "m")
    assert not report.missing and not report.unused and not report.mismatched
    assert torch.equal(other["encoder"].layers[1].ffn_in.weight, pre.bert.layers[1].ffn_in.weight)
    assert torch.equal(other["match"].classifier.weight, pre.itm.classifier.weight)
