"""The one InceptionV3 feature path of the project: rFID (Stage 1) and FID / IS / precision / recall (Stage 2).

Network: torch-fidelity's TF-compatible FID InceptionV3 (TF1-style bilinear resize to 299, pool3 2048-d
features, 1008-way logits), i.e. pytorch-fid's network, which the official tokenizer evaluation uses
(reference §5): a PyTorch port of the TensorFlow 2015-12-05 Inception graph that the original FID code and
the ADM evaluator (the paper's generation numbers) run.

Weights, one convention for both stages: the file ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's
release of the TF FID weights; torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` carries the
same SHA-256 prefix in its name, and both networks have the same key names and shapes), given with
``--inception PATH`` or, without the flag, looked up at
``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``. It is never downloaded.

A *feature function* maps uint8 images (N, 3, H, W) to ``{"pool": (N, 2048), "logits": (N, 1008)}`` float64
CPU tensors, and optionally ``"spatial": (N, 2023)`` (the sFID features below); ``InceptionFeatures`` is the
real one and returns all three, tests pass small stand-ins with the same contract.

Spatial features (sFID, as the ADM evaluator defines it): the first 7 channels of the TF graph's tensor
``mixed_6/conv:0``, 17 x 17 x 7 = 2023 values per image. In the 2015 graph the mixed blocks are numbered
``mixed`` (Mixed_5b), ``mixed_1`` ... ``mixed_10`` (Mixed_7c), so ``mixed_6`` is the port's ``Mixed_6d``
(the third 17 x 17 block, 768 -> 768); inside a block, ``conv`` is its first branch, the 1 x 1 convolution to
192 channels (the port's ``branch1x1``, loaded from ``mixed_6/conv/conv2d_params`` and ``.../batchnorm``), and
the tensor named ``mixed_6/conv`` is that layer's output after batch norm and ReLU, i.e. what
``Mixed_6d.branch1x1`` returns. We take channels 0..6 of it and flatten in the TF layout (height, width,
channel), as the evaluator's ``[..., :7]`` on NHWC does (the Frechet distance does not depend on the order).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch

from shared.checkpoint import error_line

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
FeatureFn = Callable[[torch.Tensor], Dict[str, torch.Tensor]]
PathLike = Union[str, os.PathLike]
# torch-fidelity's names for pool3 and the logits without the fc bias (its IS convention)
_LAYERS = {"pool": "2048", "logits": "logits_unbiased"}
SPATIAL_CHANNELS = 7  # of mixed_6/conv (Mixed_6d.branch1x1), the ADM evaluator's sFID features


class InceptionWeightsMissing(FileNotFoundError):
    """The InceptionV3 weights file is absent or not the FID network's state dict (one-line message)."""


def default_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def weights_source() -> str:
    """Where the weights file can be fetched (docs/evaluation-assets.md): torch-fidelity's release URL, read
    from the installed package, or pytorch-fid's ``fid_weights`` release (the same network)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError:
        return "the fid_weights release of pytorch-fid on GitHub"
    return f"{URL_INCEPTION_V3} (torch-fidelity's copy) or the fid_weights release of pytorch-fid on GitHub"


def find_weights(path: Optional[PathLike] = None) -> Path:
    """``path`` if given, else the default location; raises InceptionWeightsMissing saying where the file goes
    and where to get it."""
    p = Path(path).expanduser() if path else default_weights_path()
    if not p.is_file():
        raise InceptionWeightsMissing(
            f"InceptionV3 FID weights not found at {p}: pass --inception PATH to {INCEPTION_FILE} (pytorch-fid / "
            f"torch-fidelity FID Inception) or put it at {default_weights_path()}; nothing is downloaded: get it "
            f"from {weights_source()}")
    return p


class InceptionFeatures(torch.nn.Module):
    """Feature function of the FID InceptionV3 loaded from a local file, on ``device``."""

    def __init__(self, weights: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu"):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = find_weights(weights)
        try:  # plain tensors only: the library then reads the file itself, and must not unpickle code
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's text here suggests weights_only=False: exactly what not to do
            raise InceptionWeightsMissing(f"{path} is not a plain tensor checkpoint: it holds other Python objects "
                                          f"(refused: loading them could run code)") from None
        except Exception as e:  # truncated, unreadable, or not a torch file at all
            raise InceptionWeightsMissing(
                f"{path} is damaged or not a plain tensor checkpoint: {error_line(e)}") from None
        if not isinstance(sd, dict) or "Mixed_7c.branch_pool.conv.weight" not in sd:
            raise InceptionWeightsMissing(f"{path} is not the FID InceptionV3 state dict ({INCEPTION_FILE})")
        del sd
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", list(_LAYERS.values()),
                                                   feature_extractor_weights_path=str(path))
        except RuntimeError as e:  # strict load: missing / unexpected keys or wrong shapes
            # line 2 of a strict-load error names the tensor
            raise InceptionWeightsMissing(f"{path} does not fit the FID InceptionV3: {error_line(e, 2)}") from None
        self.net.eval().to(device)
        self._spatial: Optional[torch.Tensor] = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output: torch.Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].clone()  # (N, 7, 17, 17)

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> Dict[str, torch.Tensor]:
        device = self.net.fc.weight.device
        out = self.net(images_uint8.to(device))
        spatial, self._spatial = self._spatial, None
        feats = {k: v.double().cpu() for k, v in zip(_LAYERS, out)}
        feats["spatial"] = spatial.permute(0, 2, 3, 1).flatten(1).double().cpu()  # (N, 17 * 17 * 7), TF order
        return feats


def load_inception(weights: Optional[PathLike] = None,
                   device: Union[str, torch.device] = "cpu") -> FeatureFn:
    """The feature function both evaluation CLIs use (a seam for tests' stand-in networks)."""
    return InceptionFeatures(weights, device)


def extract_features(feature_fn: FeatureFn, images: np.ndarray, batch_size: int = 100,
                     desc: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Run ``feature_fn`` over (N, H, W, 3) uint8 images (the ADM / PNG layout) in batches; outputs concatenated.
    With ``desc``, progress in images with an ETA (``shared.progress``)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 images, got {images.dtype} {images.shape}")
    from shared.progress import progress

    parts: Dict[str, list] = {}
    bar = progress(desc=desc or "", total=len(images), unit="img", disable=desc is None)
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2)
        for k, v in feature_fn(x).items():
            parts.setdefault(k, []).append(v.double())
        bar.update(len(x))
    bar.close()
    return {k: torch.cat(v) for k, v in parts.items()}
