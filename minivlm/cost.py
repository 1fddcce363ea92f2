"""Parameter and FLOP accounting per component, beside the paper's tables (`minivlm cost`).

FLOPs follow the paper's convention: multiply-adds. `torch.utils.flop_counter` counts two FLOPs per
multiply-add, so we halve its total. The vision rows come from `minivlm.vision.cost`, the transformer
rows from `minivlm.fusion.cost`; this module only counts, formats and prints.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class CostRow:
    model: str
    component: str
    params_m: float
    gflops: float | None
    paper_params_m: float | None = None
    paper_gflops: float | None = None
    setting: str = ""  # input size / proposal count / sequence lengths the FLOPs were measured at


def count_params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@torch.no_grad()
def count_macs(fn: Callable[[], object]) -> int:
    """Multiply-adds of one call of `fn`, counted by PyTorch's own FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[CostRow]) -> str:
    header = f"{'model':<11} {'component':<14} {'params(M)':>9} {'paper':>7} {'GFLOPs':>8} {'paper':>7}  setting"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.model:<11} {r.component:<14} {_fmt(r.params_m, 2):>9} {_fmt(r.paper_params_m, 1):>7} "
            f"{_fmt(r.gflops, 2):>8} {_fmt(r.paper_gflops, 2):>7}  {r.setting}"
        )
    return "\n".join(lines)


def all_rows(vision: bool = True, fusion: bool = True) -> list[CostRow]:
    rows: list[CostRow] = []
    if vision:
        from minivlm.vision.cost import vision_cost_rows

        rows += vision_cost_rows()
    if fusion:
        from minivlm.fusion.cost import fusion_cost_rows

        rows += fusion_cost_rows()
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="emit a JSON list of rows instead of a table")
    parser.add_argument("--only", choices=["vision", "fusion"], help="only one half of the model")


def run(args) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = all_rows(vision=args.only != "fusion", fusion=args.only != "vision")
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
    else:
        print(format_table(rows))
    return 0
