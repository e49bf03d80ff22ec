import os
import signal
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _sigpipe_as_python_sets_it():
    """A script's `--help` run in-process sets SIGPIPE to the default (common.run_command: `--help | head` stops
    quietly); put back Python's ignore, so a later test writing to a closed pipe gets an error, not a dead pytest."""
    yield
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)


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


# A training script run with one change: right after the log record of step `at`, the process sends SIGTERM to
# its whole process group (DataLoader workers included), as a scheduler pre-empting the job does.
SIGNAL_AT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import common as C, {module} as M
log = C.RunLog.log
def log_and_signal(self, step, **m):  # the scheduler's SIGTERM to the whole process group, at step {at}
    log(self, step, **m)
    if step == {at} and "loss" in m:
        os.killpg(0, signal.SIGTERM)
C.RunLog.log = log_and_signal
M.main(sys.argv[1:])
"""


@pytest.fixture
def signal_script(tmp_path):
    """signal_script(module, at) -> path of a script that runs `module.main(argv)` and SIGTERMs its process group
    after logging step `at` (run it with start_new_session=True)."""
    def make(module: str, at: int) -> str:
        path = tmp_path / f"signal_at_{module}.py"
        path.write_text(SIGNAL_AT.format(root=ROOT, module=module, at=at))
        return str(path)
    return make
