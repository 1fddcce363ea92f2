import dataclasses

import pytest

from minivlm import config


def test_tee_presets_follow_efficientdet_scaling():
    expected = {"tee0": ("efficientnet_b0", 64, 3, 512), "tee1": ("efficientnet_b1", 88, 4, 640),
                "tee2": ("efficientnet_b2", 112, 5, 768), "tee3": ("efficientnet_b3", 160, 6, 896)}
    for name, (backbone, ch, layers, size) in expected.items():
        c = config.get_tee(name)
        assert (c.backbone, c.fpn_channels, c.fpn_layers, c.image_size) == (backbone, ch, layers, size)
        assert (c.min_level, c.max_level, c.roi_size, c.region_dim) == (2, 6, 4, 1024)
        assert (c.num_classes, c.num_attributes) == (1600, 400)
    assert config.get_tee("tee0").paper.total_params_m == 7.5
    assert config.get_tee("tee0").max_regions == 50


def test_bert_presets_are_table2():
    table2 = {"bert-base": (12, 768, 3072, 134.3, 8.2), "bert8": (8, 768, 3072, 106.0, 5.8),
              "tinybert6": (6, 768, 3072, 91.8, 4.6), "bert4": (4, 768, 3072, 77.6, 3.3),
              "minilm": (12, 384, 1536, 45.7, 2.3), "tinybert4": (4, 312, 1200, 24.3, 0.8)}
    for name, (layers, hidden, ffn, params, gflops) in table2.items():
        c = config.get_bert(name)
        assert (c.num_layers, c.hidden_size, c.intermediate_size) == (layers, hidden, ffn)
        assert (c.paper_params_m, c.paper_gflops) == (params, gflops)
        assert (c.max_regions, c.max_text_len, c.region_dim, c.box_dim) == (50, 35, 1024, 6)


def test_task_settings_carry_the_papers_numbers():
    assert config.VQATaskConfig().num_answers == 3129
    p = config.PretrainTaskConfig()
    assert (p.mask_prob, p.mask_token_frac, p.random_token_frac, p.itm_pollute_prob) == (0.15, 0.8, 0.1, 0.5)
    from minivlm.setup_args import load_recipe

    assert load_recipe("pretrain", "vl-pretrain")["train"] == dict(epochs=100, batch_size=2048, lr=4e-4,
                                                                   optimizer="adamw", schedule="linear", weight_decay=0.01)
    assert load_recipe("detector", "tee-vg")["train"]["lr"] == 0.2
    assert config.get_butd("butd-r101").paper.total_gflops == 767.0


def test_presets_are_copies_and_round_trip_json():
    a = config.get_tee("tee0")
    a.image_size = 64
    assert config.get_tee("tee0").image_size == 512
    c = config.get_bert("minilm")
    assert config.from_dict(config.BertConfig, config.to_dict(c)) == c
    t = config.get_tee("tee1")
    back = config.from_dict(config.TEEConfig, dataclasses.asdict(t) | {"unknown_future_key": 1})
    assert back.anchor_ratios == t.anchor_ratios and back.name == "tee1"


def test_unknown_preset_names_the_choices():
    with pytest.raises(KeyError, match="minilm"):
        config.get_bert("bert-huge")
