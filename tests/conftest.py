import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # The test models are tiny: waking a second OpenMP thread for every op costs more than the op itself,
    # and on a busy machine far more (a 64-wide linear layer took 9 ms with 2 threads, 0.05 ms with 1).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def torchrun():
    """Runs `minivlm ARGS...` on two CPU ranks (gloo) through torchrun, in a fresh process tree; returns the
    CompletedProcess (stderr captured, for the assertion message)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import free_port

    def run(*args: str) -> subprocess.CompletedProcess:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(port), "-m", "minivlm.cli", *map(str, args)],
                              env=env, capture_output=True, text=True, timeout=300)
    return run
