import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def single_cpu_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads waiting for a core
    # they share make some steps a hundred times slower
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)
