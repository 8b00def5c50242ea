import os

import pytest
import torch

# Two cores are shared by the whole suite: keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def torchrun_cmd():
    """argv prefix for a 2-process CPU torchrun on loopback: append the script and its arguments."""
    import sys

    from free_port import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}"]


@pytest.fixture
def one_thread():
    """For files of tiny models: a second thread only adds contention on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """A few dozen real photo patches (scikit-image's bundled images), 24 px, for the tokenizer trainer."""
    from PIL import Image

    from fixtures_images import export_skimage_photos

    root = tmp_path_factory.mktemp("photos")
    export_skimage_photos(root, tile=96, names=("astronaut", "coffee"))
    for p in sorted(root.iterdir()):
        Image.open(p).resize((24, 24), Image.BICUBIC).save(p)
    return root
