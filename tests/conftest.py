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
