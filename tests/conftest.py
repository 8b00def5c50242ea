import os

import pytest
import torch

# Two cores are shared by the whole suite: keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    """A TCP port on loopback that was free a moment ago (for torchrun / ray head in tests)."""
    return _free_port()


@pytest.fixture
def torchrun_cmd(free_port):
    """argv prefix for a 2-process CPU torchrun on loopback: append the script and its arguments."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port}"]
