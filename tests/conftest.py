import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def free_port():
    """A free TCP port on localhost for a gloo process group of spawned test ranks."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than on two fighting over a shared 2-core machine; a test module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small synthetic world shared by the tests (generated once per session)."""
    import common as C
    return C.synthetic_world(str(tmp_path_factory.mktemp("cache")), 2000, 200, 32, seed=0, shard_size=250)
