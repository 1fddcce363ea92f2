"""Table 2: parameters and multiply-adds of each compact-BERT preset.

Counted as the paper counts "the whole transformer model, including embedding and decoding layers":
text/tag embeddings, the region projection Linear(region_dim + 6 -> H), the encoder layers and the MLM
head with its untied decoder, and BERT's [CLS] pooler (with it every preset lands within 0.1 M of the
paper; without it each is 0.6 M / 0.15 M short, so the paper counted it). FLOPs are one forward pass over
50 regions + 35 text tokens, the decoder applied to the 35 text tokens. Models are built on the meta
device: shapes only, no memory, no initialisation time.
"""

from __future__ import annotations

import dataclasses

import torch

from minivlm.config import BERT_PRESETS, BertConfig
from minivlm.cost import CostRow, count_macs, count_params
from minivlm.fusion.heads import MLMHead, Pooler
from minivlm.fusion.transformer import MultimodalBert

TABLE2_PRESETS = ("bert-base", "bert8", "tinybert6", "bert4", "minilm", "tinybert4")


def fusion_cost(cfg: BertConfig, num_regions: int = 50, num_text: int = 35) -> tuple[int, int]:
    """(parameters, multiply-adds) of MultimodalBert + MLM head + pooler for one image."""
    with torch.device("meta"):
        bert, mlm, pooler = MultimodalBert(cfg).eval(), MLMHead(cfg).eval(), Pooler(cfg).eval()
        ids = torch.zeros(1, num_text, dtype=torch.long)
        feats = torch.zeros(1, num_regions, cfg.region_dim)
        boxes = torch.zeros(1, num_regions, cfg.box_dim)

    def forward() -> None:
        hidden = bert(input_ids=ids, region_feats=feats, region_boxes=boxes).hidden_states
        mlm(hidden[:, :num_text])
        pooler(hidden)

    return count_params(bert, mlm, pooler), count_macs(forward)


def fusion_cost_rows(presets: tuple[str, ...] = TABLE2_PRESETS, region_dim: int = 1024) -> list[CostRow]:
    rows = []
    for name in presets:
        cfg = dataclasses.replace(BERT_PRESETS[name], region_dim=region_dim)
        params, macs = fusion_cost(cfg)
        rows.append(CostRow(
            model=name, component="transformer", params_m=params / 1e6, gflops=macs / 1e9,
            paper_params_m=cfg.paper_params_m, paper_gflops=cfg.paper_gflops,
            setting=f"{cfg.num_layers}/{cfg.hidden_size}/{cfg.intermediate_size}, 50 regions "
                    f"({region_dim}+6-d) + 35 tokens",
        ))
    return rows
