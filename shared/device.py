"""Device and distributed setup: the one place that knows about CUDA, Ascend NPU and CPU.

Model code stays single-device; entry points call ``init_distributed()`` once, which reads torchrun's
environment (RANK, LOCAL_RANK, WORLD_SIZE), picks the accelerator and the matching collective backend
(nccl on CUDA, hccl on Ascend, gloo on CPU), and returns a small record of where this process runs.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from shared import collectives
from shared.runlog import set_rank

_BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)

    return hasattr(torch, "npu") and torch.npu.is_available()


def device_type(prefer: Optional[str] = None) -> str:
    """'cuda', 'npu' or 'cpu': ``prefer`` if given (and usable), else the first accelerator found."""
    if prefer not in (None, "auto"):
        if prefer == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        if prefer == "npu" and not _npu_available():
            raise RuntimeError("device 'npu' requested but torch_npu / an Ascend NPU is not available")
        if prefer not in _BACKENDS:
            raise ValueError(f"unknown device {prefer!r}; use auto, cuda, npu or cpu")
        return prefer
    return accelerator_name() or "cpu"


def accelerator_name() -> Optional[str]:
    """'cuda' or 'npu' when that accelerator is usable here (CUDA first), else None: what RNG capture covers."""
    if torch.cuda.is_available():
        return "cuda"
    if _npu_available():
        return "npu"
    return None


def accelerator_module(name: str):
    """``torch.cuda`` or ``torch.npu`` (the latter registered by torch_npu)."""
    return getattr(torch, name)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(prefer: Optional[str] = None) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a single process."""
    kind = device_type(prefer)
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if kind == "cpu":
        device = torch.device("cpu")
    else:
        device = torch.device(kind, local_rank)
        accelerator_module(kind).set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=_BACKENDS[kind])
    set_rank(rank)  # every log line from now on carries this rank (and only rank 0 logs info)
    return DistInfo(rank, local_rank, world, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(prefer: Optional[str] = None) -> Iterator[DistInfo]:
    """``init_distributed`` for the body; on the way out, the one teardown rule of the trainers.

    After a body that succeeded, every rank meets first: the first rank done must not tear its process group
    down while another still uses it (rank 0 exporting, saving or merging). Then a garbage collection, so
    that objects in reference cycles that hold the group (a DDP-wrapped model, its reducer) are freed now
    rather than during interpreter shutdown, and the group is destroyed. After a failure there is no meeting
    (a rank that died would never come). A group that already existed (a caller's) is left alone."""
    owns = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(prefer)
    succeeded = False
    try:
        yield info
        succeeded = True
    finally:
        if owns:
            if succeeded and info.distributed:
                collectives.barrier()
            gc.collect()
            cleanup_distributed()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (for timing); a no-op on CPU."""
    if device.type in ("cuda", "npu"):
        accelerator_module(device.type).synchronize(device)


def autocast(device: torch.device, precision: str = "fp32"):
    """Autocast context for 'fp32' (none), 'bf16' or 'fp16' on the given device."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
    return torch.autocast(device_type=device.type, dtype=dtypes[precision])


def max_memory_allocated(device: torch.device) -> Optional[int]:
    if device.type in ("cuda", "npu"):
        return accelerator_module(device.type).max_memory_allocated(device)
    return None
