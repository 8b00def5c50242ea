"""Fixtures for the whole suite (tests/README.md lists them). tests/ is on sys.path because this file is its
top-level conftest (pytest's default "prepend" import mode): helpers import as ``support.<module>``."""
import os

import pytest
import torch

# Two cores are shared by the whole suite: keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def torchrun_cmd():
    """argv prefix for a 2-process CPU torchrun on loopback: append the script and its arguments."""
    import sys

    from support.free_port import free_port

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
    from support.fixtures_images import export_skimage_photos

    root = tmp_path_factory.mktemp("photos")
    export_skimage_photos(root, tile=96, names=("astronaut", "coffee"), size=24)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """(ar, tokenizer): an ``ar-tiny`` and a ``tokenizer-tiny`` checkpoint, seeded random weights, no training.

    Built as the tests that shared this pair always built it: seed 0, the tokenizer, then the AR model with
    its heads drawn from N(0, 0.5) so that samples depend on the seed and the class. The global RNG is left as
    it was. Shared by the whole session: read them, copy them to change them."""
    from stage1_tokenizer.config import PRESETS as TOK_PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer
    from stage2_ar.config import PRESETS as AR_PRESETS
    from stage2_ar.model import FactorizedAR

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Tokenizer(TOK_PRESETS["tokenizer-tiny"]).save(root / "tok")
        model = FactorizedAR(AR_PRESETS["ar-tiny"])
        with torch.no_grad():
            for h in model.heads:
                h.weight.normal_(0, 0.5)
        model.save(root / "ar")
    return root / "ar", root / "tok"


@pytest.fixture(scope="session")
def tiny_tokenizer_ckpt(tiny_checkpoints):
    """A ``tokenizer-tiny`` checkpoint directory (the weights of ``torch.manual_seed(0)`` then the model)."""
    return tiny_checkpoints[1]


@pytest.fixture(scope="session")
def tiny_ar_ckpt(tiny_checkpoints):
    """An ``ar-tiny`` checkpoint directory whose samples depend on the seed and the class (see tiny_checkpoints)."""
    return tiny_checkpoints[0]


@pytest.fixture(scope="session")
def token_dataset(tmp_path_factory):
    """Factory of synthetic token datasets (written by ``support.synthetic_tokens.write_tokens``), one per set of
    arguments for the whole session: ``token_dataset(n, ...)`` returns the dataset's directory. Read it only.

    n images of labels ``arange(n) % classes`` drawn from ``numpy.random.default_rng(seed)``, with
    tokens "random": every image its own random grid (shape (n, views, h*w) when ``views`` names them);
    tokens "by-class": one random grid per class (learnable), then a ``noise`` fraction of the tokens redrawn.
    ``val``: the first ``val`` images again as a "val" split. ``shard_bytes``: the MDS shard size (None: the
    writer's default)."""
    import numpy as np

    from support.synthetic_tokens import write_tokens

    made = {}

    def make(n, *, tokens="random", noise=0.0, val=0, classes=10, grid=(4, 4), views=None, shard_bytes=None,
             seed=0):
        key = (n, tokens, noise, val, classes, tuple(grid), None if views is None else tuple(views), shard_bytes, seed)
        if key in made:
            return made[key]
        rng = np.random.default_rng(seed)
        labels = np.arange(n) % classes
        size = grid[0] * grid[1]
        if tokens == "random":
            tok = rng.integers(0, 1 << 18, (n, size) if views is None else (n, len(views), size))
        elif tokens == "by-class" and views is None:
            tok = rng.integers(0, 1 << 18, (classes, size))[labels]
            if noise:
                redraw = rng.random(tok.shape) < noise
                tok[redraw] = rng.integers(0, 1 << 18, int(redraw.sum()))
        else:
            raise ValueError(f"token_dataset: tokens={tokens!r} views={views!r} is not a dataset this factory makes")
        splits = {"train": (tok, labels)}
        if val:
            splits["val"] = (tok[:val], labels[:val])
        kwargs = {} if shard_bytes is None else {"shard_bytes": shard_bytes}
        if views is not None:
            kwargs["views"] = tuple(views)
        out = tmp_path_factory.mktemp("tokens")
        write_tokens(out, splits, grid=tuple(grid), num_classes=classes, **kwargs)
        made[key] = out
        return out

    return make
