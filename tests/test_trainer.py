import json

import pytest
import torch
from torch import nn

from minivlm.config import TrainConfig
from minivlm.train.trainer import ShardedSampler, Trainer, lr_lambda, read_log


class Regression(nn.Module):
    """y = w.x + b on fixed data; raises on the `crash_at`-th forward to simulate a kill."""

    def __init__(self, crash_at: int | None = None):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.calls, self.crash_at = 0, crash_at

    def forward(self, batch):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise RuntimeError("simulated kill")
        x, y = batch
        loss = ((self.lin(x).squeeze(1) - y) ** 2).mean()
        return {"loss": loss, "mae": (self.lin(x).squeeze(1) - y).abs().mean()}


def make_data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.3
    return list(zip(x, y))


def collate(items):
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])


def cfg(**kw):
    base = dict(epochs=4, batch_size=8, lr=0.05, optimizer="sgd", schedule="cosine", weight_decay=0.0,
                log_every=2, ckpt_every=5, grad_clip=None)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_decreases_and_log_written(tmp_path):
    torch.manual_seed(0)
    model = Regression()
    Trainer(model, cfg(), tmp_path).fit(make_data(), collate)
    log = read_log(tmp_path / "log.jsonl")
    assert log[0]["step"] == 2 and log[-1]["step"] == 32  # 64 samples / 8 per batch x 4 epochs
    assert log[-1]["loss"] < 0.1 * log[0]["loss"]
    assert "mae" in log[-1] and "lr" in log[-1]
    assert (tmp_path / "model.safetensors").is_file()


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    torch.manual_seed(1)
    reference = Regression()
    init = {k: v.clone() for k, v in reference.state_dict().items()}
    Trainer(reference, cfg(), tmp_path / "ref").fit(make_data(), collate)

    crashing = Regression(crash_at=13)  # dies during step 13, after the step-10 checkpoint
    crashing.load_state_dict(init)
    with pytest.raises(RuntimeError, match="simulated kill"):
        Trainer(crashing, cfg(), tmp_path / "run").fit(make_data(), collate)
    assert (tmp_path / "run" / "checkpoint" / "latest").read_text() == "step-0000010"

    resumed = Regression()  # a fresh process: different random init, restored from the checkpoint
    Trainer(resumed, cfg(), tmp_path / "run").fit(make_data(), collate)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v)
    steps = [e["step"] for e in read_log(tmp_path / "run" / "log.jsonl")]
    assert steps == sorted(set(steps))  # no duplicated log entries after the resume
    assert not list((tmp_path / "run" / "checkpoint").glob(".*tmp"))


class NoisyData(torch.utils.data.Dataset):
    """make_data() with noise drawn from the global RNGs when an item is read (as augmentation does), and more in
    `noisy_collate` (as MLM masking does): in data-loader workers, those draws come from the workers' RNGs."""

    def __init__(self):
        self.items = make_data()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import random

        import numpy as np

        x, y = self.items[i]
        return x + 0.1 * torch.randn(4), y + 0.01 * (random.random() + float(np.random.rand()))


def noisy_collate(items):
    x, y = collate(items)
    return x * (1 + 0.05 * torch.rand(len(items), 1)), y


def test_resume_with_data_loader_workers_matches_uninterrupted_run(tmp_path):
    """With 2 workers, the batch a worker reads after a mid-epoch resume is not the one it read in the
    uninterrupted run: its random draws must not depend on that."""
    torch.manual_seed(1)
    reference = Regression()
    init = {k: v.clone() for k, v in reference.state_dict().items()}
    Trainer(reference, cfg(num_workers=2), tmp_path / "ref").fit(NoisyData(), noisy_collate)

    crashing = Regression(crash_at=13)  # dies during step 13 (epoch 1, batch 4), after the step-10 checkpoint
    crashing.load_state_dict(init)
    with pytest.raises(RuntimeError, match="simulated kill"):
        Trainer(crashing, cfg(num_workers=2), tmp_path / "run").fit(NoisyData(), noisy_collate)
    resumed = Regression()
    Trainer(resumed, cfg(num_workers=2), tmp_path / "run").fit(NoisyData(), noisy_collate)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)

    torch.manual_seed(1)
    other = Regression()
    Trainer(other, cfg(num_workers=2, seed=5), tmp_path / "seed5").fit(NoisyData(), noisy_collate)
    assert not torch.equal(other.lin.weight, reference.lin.weight)  # the draws follow the run's seed


def test_sampler_shards_cover_each_index_once_and_resume_midway():
    n, world = 10, 3
    orders = []
    for epoch in range(2):
        parts = []
        for rank in range(world):
            s = ShardedSampler(n, rank, world, seed=7)
            s.set_epoch(epoch)
            parts.append(list(s))
        assert len({len(p) for p in parts}) == 1  # equal work per rank (padded)
        assert set(sum(parts, [])) == set(range(n))
        # disjoint apart from the padding: 12 slots for 10 indices, so exactly 2 repeats in all
        assert len(sum(parts, [])) == 12 and len(set(sum(parts, []))) == n
        orders.append(sum(parts, []))
    assert orders[0] != orders[1]  # each epoch reshuffles
    s = ShardedSampler(n, 0, 1, seed=7)
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, start=4)
    assert list(s) == full[4:]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules_decay_to_zero_after_warmup(schedule):
    f = lr_lambda(schedule, warmup=10, total=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(110) == pytest.approx(0.0, abs=1e-9)
    assert f(60) < f(30)


def test_eval_fn_results_logged(tmp_path):
    model = Regression()
    calls = []

    def eval_fn(m, step):
        calls.append(step)
        return {"val_mae": float(m(collate(make_data(16)))["mae"])}

    out = Trainer(model, cfg(epochs=1, eval_every=4), tmp_path).fit(make_data(), collate, eval_fn)
    assert calls == [4, 8]
    assert "val_mae" in out["eval"]
    evals = [e for e in read_log(tmp_path / "log.jsonl") if "eval" in e]
    assert [e["step"] for e in evals] == [4, 8]
    json.dumps(evals)


class DtypeProbe(Regression):
    """Records the dtype its linear layer computes in (bf16 under autocast)."""

    def forward(self, batch):
        self.seen = self.lin(batch[0]).dtype
        return super().forward(batch)


@pytest.mark.parametrize("cpu_amp", [False, True])
def test_cpu_amp_runs_bf16_only_when_asked_and_supported(tmp_path, cpu_amp):
    from minivlm.train.trainer import cpu_has_bf16

    torch.manual_seed(0)
    model = DtypeProbe()
    Trainer(model, cfg(cpu_amp=cpu_amp, epochs=8), tmp_path).fit(make_data(), collate)
    expected = torch.bfloat16 if cpu_amp and cpu_has_bf16() else torch.float32
    assert model.seen == expected
    assert model.lin.weight.dtype == torch.float32  # weights and checkpoints stay fp32
    log = read_log(tmp_path / "log.jsonl")
    assert log[-1]["loss"] < 0.1 * log[0]["loss"]  # still learns in bf16


KILL_TRAIN = """
import os, signal, sys
import torch
from torch import nn
from minivlm.config import TrainConfig
from minivlm.train.trainer import Trainer

out, kill_at, init_seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


class Net(nn.Module):  # dropout and AdamW: the RNG and the optimizer's moments must resume too
    def __init__(self):
        super().__init__()
        self.lin1, self.drop, self.lin2, self.calls = nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1), 0

    def forward(self, batch):
        self.calls += 1
        if self.calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of a step: nothing gets to clean up
        x, y = batch
        return {"loss": ((self.lin2(self.drop(torch.relu(self.lin1(x)))).squeeze(1) - y) ** 2).mean()}


g = torch.Generator().manual_seed(0)
x = torch.randn(60, 4, generator=g)
data = list(zip(x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0])))
collate = lambda items: (torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]))
torch.manual_seed(init_seed)
net = Net()
cfg = TrainConfig(epochs=3, batch_size=8, lr=0.01, optimizer="adamw", schedule="cosine", weight_decay=0.01,
                  log_every=2, ckpt_every=4, grad_clip=1.0, seed=0)
Trainer(net, cfg, out).fit(data, collate)
print("steps run", net.calls)
"""


def test_kill_minus_9_then_rerun_ends_where_an_uninterrupted_run_does(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def train(out, kill_at, init_seed=0):
        r = subprocess.run([sys.executable, "-c", KILL_TRAIN, str(out), str(kill_at), str(init_seed)], env=env,
                           capture_output=True, text=True)
        steps = [int(line.split()[-1]) for line in r.stdout.splitlines() if line.startswith("steps run")]
        return r.returncode, steps[0] if steps else None

    rc, total = train(tmp_path / "ref", -1)
    assert rc == 0
    want = load_file(tmp_path / "ref" / "model.safetensors")
    for kill_at in (3, 10, 19):  # before the first checkpoint (step 4), between checkpoints, in the last epoch
        out = tmp_path / f"killed{kill_at}"
        assert train(out, kill_at)[0] == -signal.SIGKILL
        assert not (out / "model.safetensors").exists()
        # The same command again. Past a checkpoint, the rerun draws other initial weights: only what the
        # checkpoint restores (weights, AdamW moments, scheduler, RNG, data order) can make it end the same.
        resumed_from = (kill_at - 1) // 4 * 4
        rc, steps = train(out, -1, init_seed=0 if resumed_from == 0 else 1)
        assert rc == 0 and steps == total - resumed_from
        got = load_file(out / "model.safetensors")
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=f"kill at step {kill_at}: {k} differs")


def test_accumulated_micro_batches_take_the_same_steps_as_the_whole_batch(tmp_path):
    # Batch 8 as 4 micro-batches of 2: the same mean gradient, so the same weights (to rounding), the same
    # number of optimizer steps and the same schedule; the model sees 4x the forward calls.
    def train(accumulate: int):
        torch.manual_seed(3)
        model = Regression()
        Trainer(model, cfg(accumulate=accumulate), tmp_path / str(accumulate)).fit(make_data(), collate)
        return model, read_log(tmp_path / str(accumulate) / "log.jsonl")

    (whole, log1), (micro, log4) = train(1), train(4)
    assert [e["step"] for e in log1] == [e["step"] for e in log4] and log4[-1]["step"] == 32
    assert [e["lr"] for e in log1] == pytest.approx([e["lr"] for e in log4])
    assert micro.calls == 4 * whole.calls
    assert torch.allclose(whole.lin.weight, micro.lin.weight, atol=1e-5)
    assert torch.allclose(whole.lin.bias, micro.lin.bias, atol=1e-5)
    assert [e["loss"] for e in log1] == pytest.approx([e["loss"] for e in log4], rel=1e-4)


def test_a_batch_that_does_not_split_into_micro_batches_is_refused(tmp_path):
    from minivlm.errors import MiniVLMError  # a one-line error on the command line, not a traceback

    with pytest.raises(MiniVLMError, match="--accumulate"):
        Trainer(Regression(), cfg(batch_size=8, accumulate=3), tmp_path).fit(make_data(), collate)
