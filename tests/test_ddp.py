"""DDP through the Trainer: two CPU processes (gloo) train the pre-training model for a few steps; the
weights stay identical across ranks and match a single-process run on the same global batches."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from minivlm.config import BertConfig, TrainConfig
from minivlm.fusion.inputs import build_batch
from minivlm.io import load_weights, save_weights
from minivlm.regions import Regions
from minivlm.tasks.pretrain import IGNORE, PretrainModel
from minivlm.text.tokenizer import get_tokenizer

from helpers import free_port

TINY = BertConfig("tiny", num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4, dropout=0.0,
                  region_dim=8, max_regions=4, max_text_len=12, max_tag_len=4)
WORDS = ["red", "green", "blue", "circle", "square", "star", "big", "small"]
N_EXAMPLES, GLOBAL_BATCH, STEPS = 16, 8, 4


def make_examples() -> list[tuple[str, list[str], Regions, int]]:
    """Deterministic (text, tags, regions, ITM label) examples."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(N_EXAMPLES):
        words = [WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 3)]
        k = 1 + i % 4
        xy = torch.rand(k, 2, generator=g) * 10
        regions = Regions(torch.cat([xy, xy + 5], 1), torch.randn(k, TINY.region_dim, generator=g), torch.rand(k, generator=g),
                          torch.zeros(k, dtype=torch.long), (20, 20))
        out.append((" ".join(words), [WORDS[i % 3]], regions, i % 2))
    return out


SEEN: list[int] = []  # batch sizes this process collated


def collate(items):
    """OSCAR inputs with fixed MLM targets: exactly the first two word pieces of every text, so every
    example weighs the same in each rank's mean loss (then the mean of the ranks' means is the global mean)."""
    SEEN.append(len(items))
    tok = get_tokenizer()
    batch = build_batch(tok, [t for t, _, _, _ in items], [g for _, g, _, _ in items], [r for _, _, r, _ in items], TINY)
    labels = torch.full_like(batch.input_ids, IGNORE)
    labels[:, 1:3] = batch.input_ids[:, 1:3]
    ids = batch.input_ids.clone()
    ids[:, 1:3] = tok.mask_id
    return dataclasses.replace(batch, input_ids=ids, mlm_labels=labels,
                               itm_labels=torch.tensor([y for _, _, _, y in items]))


def train(out_dir: Path, accumulate: int = 1) -> tuple[dict[str, torch.Tensor], int]:
    from minivlm.train.trainer import Trainer

    torch.manual_seed(0)
    model = PretrainModel(TINY)
    cfg = TrainConfig(epochs=10, max_steps=STEPS, batch_size=GLOBAL_BATCH, lr=1e-3, optimizer="adamw",
                      schedule="linear", log_every=1, ckpt_every=100, amp=False, seed=0, accumulate=accumulate)
    trainer = Trainer(model, cfg, out_dir, desc="ddp")
    trainer.fit(make_examples(), collate)
    return model.state_dict(), trainer.world


def _worker(rank: int, world: int, port: int, out_dir: str, accumulate: int = 1) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    state, seen_world = train(Path(out_dir), accumulate)
    save_weights(state, Path(out_dir) / f"rank{rank}.safetensors")
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"world": seen_world, "batches": SEEN}))
    torch.distributed.destroy_process_group()


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ddp_two_ranks_match_single_process(tmp_path, accumulate):
    # accumulate 2: each rank's half of the global batch in two micro-batches (gradients synchronised
    # once, on the second), the same steps as one process taking the whole batch at once
    ddp_dir = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, free_port(), str(ddp_dir), accumulate), nprocs=2, join=True)
    rank0, rank1 = load_weights(ddp_dir / "rank0.safetensors"), load_weights(ddp_dir / "rank1.safetensors")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    for rank in (0, 1):  # really distributed: each rank collated half of every global batch
        seen = json.loads((ddp_dir / f"rank{rank}.json").read_text())
        assert seen == {"world": 2, "batches": [GLOBAL_BATCH // 2 // accumulate] * (STEPS * accumulate)}

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        assert var not in os.environ  # the reference run is a plain single process
    single, world = train(tmp_path / "single")
    assert world == 1
    moved = 0.0
    torch.manual_seed(0)
    start = PretrainModel(TINY).state_dict()
    for name, w in single.items():
        assert torch.allclose(rank0[name], w, atol=1e-5, rtol=1e-4), name
        moved = max(moved, float((w - start[name]).abs().max()))
    assert moved > 1e-3  # training really changed the weights

    ddp_losses, single_losses = _losses(ddp_dir / "log.jsonl"), _losses(tmp_path / "single" / "log.jsonl")
    assert len(ddp_losses) == len(single_losses) == STEPS
    assert max(abs(a - b) for a, b in zip(ddp_losses, single_losses)) < 1e-4
