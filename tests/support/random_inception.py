"""A *randomly initialised* FID InceptionV3 saved in the real weights-file format, for tests.

No pretrained Inception weights exist on test machines (and nothing is downloaded), so the loading and
forward code is exercised with torch-fidelity's network built with its weight loading switched off, then
saved like the released file (same keys and shapes). The convolutions are He-normal initialised: with
PyTorch's default init the signal dies out over the ~90 layers and every image gets the same features.
Numbers computed with it are not real FIDs.
"""
from pathlib import Path
from unittest import mock

import torch


def write_random_inception(path: Path, seed: int = 0) -> Path:
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        torch.manual_seed(seed)
        net = fe.FeatureExtractorInceptionV3("random", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    sd = net.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path
