"""Tokenizer losses: frozen LPIPS, the GAN terms and LeCAM regularisation (reference §3).

Generator:      L1 + LPIPS-VGG + 0.1 * non-saturating GAN (on the spatially averaged PatchGAN logit)
                + 0.1 * (per-sample entropy - codebook entropy) + 0.25 * commitment
Discriminator:  hinge loss on per-patch logits + LeCAM (EMA decay 0.999; weight 0.01 for the 128 model,
                0.05 for the 256 model)

LPIPS weights. The ``lpips`` package ships only its linear heads; the VGG16 trunk is torchvision's
ImageNet file ``vgg16-397923af.pth``, which machines without internet cannot download. ``build_lpips``
never downloads: it reads the trunk from an explicit path or from ``$TORCH_HOME/hub/checkpoints/`` and
fails with a clear message when neither exists, unless the caller explicitly allows a random trunk (tests,
offline demos), which is logged as a loud warning because such an LPIPS value means nothing perceptually.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from shared.runlog import get_logger

log = get_logger(__name__)

# torchvision's ImageNet weights for the LPIPS trunks (file names fixed by torchvision's model zoo).
TRUNK_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
# lpips.pretrained_networks slices the torchvision `features` Sequential at these indices.
TRUNK_SLICES = {"vgg": (0, 4, 9, 16, 23, 30), "alex": (0, 2, 5, 8, 10, 12)}
TRUNK_NAMES = {"vgg": "VGG16", "alex": "AlexNet"}
# Where each trunk comes from: torchvision's model zoo (docs/evaluation-assets.md).
TRUNK_URLS = {net: f"https://download.pytorch.org/models/{name}" for net, name in TRUNK_FILES.items()}


class LPIPSWeightsMissing(FileNotFoundError):
    """The ImageNet trunk weights for LPIPS are not on this machine."""


def hub_checkpoint_dir() -> Path:
    """Where torchvision keeps downloaded weights: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_trunk_weights(net: str = "vgg", path: Optional[Union[str, Path]] = None) -> Path:
    """The trunk weight file: ``path`` if given (must exist), else the torch hub cache; clear error if absent."""
    source = f"torchvision's ImageNet weights, {TRUNK_URLS[net]} (docs/evaluation-assets.md)"
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise LPIPSWeightsMissing(f"LPIPS {net} trunk weights not found at {p}: the ImageNet "
                                      f"{TRUNK_NAMES[net]} trunk '{TRUNK_FILES[net]}' is {source}")
        return p
    p = hub_checkpoint_dir() / TRUNK_FILES[net]
    if not p.is_file():
        raise LPIPSWeightsMissing(
            f"LPIPS needs the ImageNet {TRUNK_NAMES[net]} trunk '{TRUNK_FILES[net]}', not found in {p.parent}: "
            f"{source}; put it there (set TORCH_HOME), pass an explicit weights path, or - for plumbing tests "
            f"only - allow a random trunk")
    return p


def _trunk_state_dict(net: str, file: Path) -> dict:
    """torchvision ``features.N.*`` keys -> lpips ``net.sliceK.N.*`` keys."""
    sd = torch.load(file, map_location="cpu", weights_only=True)
    bounds = TRUNK_SLICES[net]
    out = {}
    for key, t in sd.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue  # the classifier head is not part of LPIPS
        idx = int(parts[1])
        k = next(i for i in range(len(bounds) - 1) if bounds[i] <= idx < bounds[i + 1]) + 1
        out[f"net.slice{k}.{idx}.{'.'.join(parts[2:])}"] = t
    return out


@contextlib.contextmanager
def _features_only_vgg16():
    """Let lpips build torchvision's VGG16 without its 124M-parameter classifier, which LPIPS discards.

    lpips keeps only ``vgg16().features``; initialising the unused fully connected layers costs seconds
    per construction on a CPU. The stand-in has the identical ``features`` module.
    """
    import lpips.pretrained_networks as pn
    from torchvision.models.vgg import cfgs, make_layers

    original = pn.tv.vgg16
    pn.tv.vgg16 = lambda *args, **kwargs: SimpleNamespace(features=make_layers(cfgs["D"]))
    try:
        yield
    finally:
        pn.tv.vgg16 = original


class FrozenLPIPS(nn.Module):
    """LPIPS with every parameter frozen (trunk and linear heads) and always in eval mode.

    ``forward(x, y)`` takes images in [-1, 1] and returns the per-image distance, shape (B,).
    Gradients still flow to the inputs, so it serves as the perceptual loss.
    """

    def __init__(self, net: str = "vgg", weights: Optional[Union[str, Path]] = None, allow_random_trunk: bool = False):
        super().__init__()
        import lpips

        if net not in TRUNK_FILES:
            raise ValueError(f"unknown LPIPS net {net!r}; use one of {sorted(TRUNK_FILES)}")
        try:
            trunk_file = find_trunk_weights(net, weights)
        except LPIPSWeightsMissing:
            if weights or not allow_random_trunk:  # an explicitly named file must exist
                raise
            trunk_file = None
        # Build with no downloads at all (random trunk, no heads), then load both parts ourselves.
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]), _features_only_vgg16():
            warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation notice
            torch.manual_seed(0)  # the same random trunk on every rank and every run
            self.lpips = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        missing, unexpected = self.lpips.load_state_dict(torch.load(heads, map_location="cpu", weights_only=True), strict=False)
        if unexpected or any(k.startswith("lin") and not k.startswith("lins.") for k in missing):  # lins.* alias lin*
            raise RuntimeError(f"LPIPS linear heads in {heads} do not match the model")
        self.random_trunk = trunk_file is None
        if trunk_file is not None:
            missing, unexpected = self.lpips.load_state_dict(_trunk_state_dict(net, trunk_file), strict=False)
            if unexpected or any(k.startswith("net.") for k in missing):
                raise RuntimeError(f"{trunk_file} is not a torchvision {net} checkpoint "
                                   f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            self.source = str(trunk_file)
        else:
            self.source = "random trunk"
            log.warning("!" * 78)
            log.warning("LPIPS-%s runs with a RANDOM trunk: the perceptual loss/metric is meaningless.", TRUNK_NAMES[net])
            log.warning("Place %s in %s (or pass its path) for real LPIPS.", TRUNK_FILES[net], hub_checkpoint_dir())
            log.warning("!" * 78)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenLPIPS":
        return super().train(False)  # dropout in the heads must never switch on

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x.float(), y.float()).flatten()


# ---------------------------------------------------------------- GAN terms

def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) over all patches."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(mean patch logit) per image, averaged: BCE-with-logits against 'real'."""
    per_image = logits_fake.float().flatten(1).mean(1)
    return F.binary_cross_entropy_with_logits(per_image, torch.ones_like(per_image))


class LeCAM(nn.Module):
    """LeCAM regulariser (Tseng et al. 2021): keep D's outputs near the EMA of the other side's outputs.

    reg = E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(x_hat))^2]; the EMAs of the batch-mean logits
    (decay 0.999, start at 0) are updated once per optimizer step, before the term is computed, as in the
    official code (the trainer passes the mean over all its micro-batches). The EMAs are buffers, so they
    travel in the trainer state and resume exactly.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, real_mean: torch.Tensor, fake_mean: torch.Tensor) -> None:
        self.ema_real.mul_(self.decay).add_(real_mean.detach().float(), alpha=1 - self.decay)
        self.ema_fake.mul_(self.decay).add_(fake_mean.detach().float(), alpha=1 - self.decay)

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        return (F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - logits_fake.float()).pow(2).mean())

