"""Capture and restore every RNG a training step touches, in a form ``torch.load(weights_only=True)`` accepts."""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch

from shared import device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    acc = device.accelerator_name()
    if acc is not None:  # "cuda" or "npu": every device of this process
        state[acc] = device.accelerator_module(acc).get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    acc = device.accelerator_name()
    if acc is not None and acc in state:
        device.accelerator_module(acc).set_rng_state_all(state[acc])
