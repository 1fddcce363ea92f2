"""One trainer for every stage: detector, VL pre-training and the four fine-tuning tasks.

The model is any `nn.Module` whose `forward(batch)` returns a dict with a scalar "loss" (and optionally
other scalar metrics to log). The trainer owns everything else: optimizer and schedule, mixed precision
on GPU, DistributedDataParallel under `torchrun` (gloo on CPU, NCCL on GPU), a deterministic sharded
sampler, progress bars, a JSON-lines log, and checkpoints that resume exactly where a kill stopped it.

Checkpoint layout (each one written to a temporary folder, then renamed, so a kill never leaves a
half-written checkpoint):

    out_dir/checkpoint/step-000123/{model.safetensors, state.pt}   (state: optimizer, schedule, RNG)
    out_dir/checkpoint/latest                                       (name of the newest complete one)
    out_dir/log.jsonl                                               ({"step", "epoch", "lr", "loss", ...})
    out_dir/model.safetensors                                       (final weights)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from minivlm.config import TrainConfig, to_dict
from minivlm.errors import MiniVLMError
from minivlm.io import load_state, load_weights, save_state, save_weights, write_json, write_text


def move_to(obj: Any, device: torch.device) -> Any:
    """Moves tensors inside tensors, dataclasses, dicts, lists and tuples to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: move_to(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when run plainly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed() -> tuple[int, int, torch.device]:
    """Joins the process group if launched by torchrun; returns (rank, world_size, device)."""
    rank, world, local_rank = distributed_env()
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return rank, world, device


class ShardedSampler(Sampler[int]):
    """Shuffled indices for one epoch, split across ranks like DistributedSampler, but seeded by
    (seed, epoch) alone and able to start mid-epoch, so a resumed run sees exactly the batches it
    would have seen without the interruption."""

    def __init__(self, n: int, rank: int, world: int, seed: int, shuffle: bool = True, keyed: bool = False):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.keyed = keyed  # yield (index, item seed) pairs for `SeededItems`
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[: self.per_rank * self.world - self.n]  # pad so every rank gets as many samples
        mine = order[self.rank:: self.world]
        if self.keyed:  # the seed names the item's place in the run, whichever worker reads it
            base = ((self.seed * 1_000_003 + self.epoch) * 1_000_033 + self.rank) * 10_000_019
            return iter([(i, (base + pos) % 2**63) for pos, i in enumerate(mine)][self.start:])
        return iter(mine[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


class SeededItems(Dataset):
    """A dataset read in data-loader workers with `ShardedSampler(keyed=True)`: torch's, numpy's and Python's
    RNGs are seeded from each item's place in the run before it is read. A worker's own RNG runs on from batch
    to batch, so the random draws of an item (augmentation) and of the collate after it (MLM masks) would
    depend on which worker reads which batch, and a run resumed mid-epoch hands its workers other batches
    than the uninterrupted run did; seeded per item, the draws are the same in both."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.dataset[index]


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "constant":
            return 1.0
        raise ValueError(f"unknown schedule {schedule!r} (cosine, linear, constant)")

    return factor


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation weights, as BERT and EfficientNet recipes do."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, out_dir: str | Path, desc: str = "train",
                 find_unused_parameters: bool = True):
        self.cfg, self.out_dir, self.desc = cfg, Path(out_dir), desc
        self.rank, self.world, self.device = init_distributed()
        self.is_main = self.rank == 0
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device)
        self.wrapped: nn.Module = model
        if self.world > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )
        groups = model.param_groups(cfg) if hasattr(model, "param_groups") else default_param_groups(model, cfg.weight_decay)
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
        elif cfg.optimizer == "adamw":
            # The fused kernel is ~7x faster than the default per-tensor loop on CPU, where the step over the
            # 30k-word embedding and MLM decoder otherwise costs as much as the forward pass.
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r} (sgd, adamw)")
        self.step = 0
        self.log_path = self.out_dir / "log.jsonl"
        self.ckpt_root = self.out_dir / "checkpoint"
        self.amp_device = amp_device(cfg, self.device)

    # -- checkpoints -------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_root / "latest"
        if not pointer.is_file():
            return None
        path = self.ckpt_root / pointer.read_text().strip()
        return path if (path / "state.pt").is_file() and (path / "model.safetensors").is_file() else None

    def save_checkpoint(self, scheduler) -> None:
        if self.is_main:
            name = f"step-{self.step:07d}"
            final, tmp = self.ckpt_root / name, self.ckpt_root / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_weights(self.model.state_dict(), tmp / "model.safetensors")
            save_state({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()},
                       tmp / "state.pt")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            write_text(self.ckpt_root / "latest", name)
            for old in self.ckpt_root.glob("step-*"):  # keep only the newest complete checkpoint
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def _resume(self, scheduler) -> None:
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            if self.is_main:  # a run killed before its first checkpoint logged steps that this one trains again
                self._trim_log(0)
            return
        self.model.load_state_dict(load_weights(ckpt / "model.safetensors", self.device))
        state = load_state(ckpt / "state.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        if self.is_main:
            self._trim_log(self.step)
            tqdm.write(f"[{self.desc}] resumed from {ckpt} (step {self.step})")

    def _trim_log(self, step: int) -> None:
        # Entries written after the checkpoint we resume from belong to a run that never happened.
        if not self.log_path.is_file():
            return
        kept = [line for line in self.log_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text(self.log_path, "".join(line + "\n" for line in kept))

    def _log(self, entry: dict) -> None:
        if self.is_main:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, dataset: Dataset, collate_fn: Callable, eval_fn: Callable[[nn.Module, int], dict] | None = None,
            shuffle: bool = True) -> dict:
        cfg = self.cfg
        if cfg.batch_size % (self.world * cfg.accumulate):
            raise MiniVLMError(f"global batch {cfg.batch_size} is not divisible by {self.world} ranks x "
                               f"{cfg.accumulate} micro-batches (--batch-size, --accumulate)")
        local_batch = cfg.batch_size // self.world
        # Without workers the items draw from the main process's RNG, which the checkpoint restores.
        workers = cfg.num_workers > 0
        sampler = ShardedSampler(len(dataset), self.rank, self.world, cfg.seed, shuffle, keyed=workers)
        # Each new iterator over a DataLoader draws its workers' base seed from the loader's generator, by default
        # torch's global RNG. A run resumed mid-epoch starts an iterator where the uninterrupted run did not, so
        # that draw would shift the restored RNG (dropout, masks, flips) off the uninterrupted run's. A generator
        # of its own, seeded by (seed, epoch), leaves the global RNG alone and gives each epoch's workers the
        # same seeds in both runs.
        loader_rng = torch.Generator()
        loader = DataLoader(SeededItems(dataset) if workers else dataset, batch_size=local_batch // cfg.accumulate,
                            sampler=sampler, collate_fn=collate_fn, num_workers=cfg.num_workers,
                            persistent_workers=False, generator=loader_rng)
        steps_per_epoch = math.ceil(sampler.per_rank / local_batch)
        total = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps, total))
        self._resume(scheduler)
        if self.is_main:
            write_json(self.out_dir / "train_config.json", to_dict(cfg), indent=1)
        last: dict = {}
        bar = tqdm(total=total, initial=self.step, desc=self.desc, disable=not self.is_main, dynamic_ncols=True)
        window: dict[str, list[float]] = {}
        t0 = time.time()
        with bar:  # closed on the way out of an error too, so the error message starts a line of its own
            while self.step < total:
                epoch, in_epoch = divmod(self.step, steps_per_epoch)
                sampler.set_epoch(epoch, start=in_epoch * local_batch)
                loader_rng.manual_seed(cfg.seed * 1_000_003 + epoch)
                self.model.train()
                for batch in _groups(loader, cfg.accumulate):
                    out = self._train_step([move_to(b, self.device) for b in batch], scheduler)
                    for k, v in out.items():
                        window.setdefault(k, []).append(v)
                    self.step += 1
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == total:
                        means = self._mean_over_ranks({k: sum(v) / len(v) for k, v in window.items()})
                        window = {}
                        last = {"step": self.step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], **means,
                                "elapsed_s": round(time.time() - t0, 2)}
                        self._log(last)
                        bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}")
                    if eval_fn is not None and cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < total:
                        self._evaluate(eval_fn)
                    if self.step % cfg.ckpt_every == 0 or self.step == total:
                        self.save_checkpoint(scheduler)
                    if self.step >= total:
                        break
        if eval_fn is not None:
            last = {**last, "eval": self._evaluate(eval_fn)}
        if self.is_main:
            save_weights(self.model.state_dict(), self.out_dir / "model.safetensors")
        self._barrier()
        return last

    def _train_step(self, micro_batches: list, scheduler) -> dict[str, float]:
        """One optimizer step over a rank's micro-batches (one unless `accumulate`): each loss is divided by
        their number, so the step follows the mean, and DDP averages the gradients once, on the last."""
        autocast = torch.autocast(self.amp_device, dtype=torch.bfloat16) if self.amp_device else nullcontext()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        n = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            sync = i == n - 1 or not isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
            with nullcontext() if sync else self.wrapped.no_sync():  # no_sync must hold the backward too
                with autocast:
                    out = self.wrapped(batch)
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"[{self.desc}] loss became {loss.item()} at step {self.step}")
                (loss / n if n > 1 else loss).backward()
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / n
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        scheduler.step()
        return sums

    def _evaluate(self, eval_fn) -> dict:
        result: dict = {}
        if self.is_main:
            self.model.eval()
            with torch.no_grad():
                result = eval_fn(self.model, self.step)
            self.model.train()
            self._log({"step": self.step, "eval": result})
            tqdm.write(f"[{self.desc}] step {self.step}: " + ", ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
        self._barrier()
        return result


def _groups(loader, size: int):
    """The loader's micro-batches, `size` at a time (the epoch's last group may be shorter)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX); elsewhere autocast would emulate it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_device(cfg: TrainConfig, device: torch.device) -> str | None:
    """The autocast device type for bf16 mixed precision, or None for fp32: a GPU when `amp`, the CPU only
    when `cpu_amp` and it has bf16 units (asked for on a CPU without them, training runs in fp32)."""
    if device.type == "cuda":
        return "cuda" if cfg.amp else None
    return "cpu" if device.type == "cpu" and cfg.cpu_amp and cpu_has_bf16() else None


def read_log(path: str | Path) -> list[dict]:
    """The entries of a trainer's log.jsonl (for plots and reports)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
