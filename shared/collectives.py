"""Rank reductions, gathers and barriers: the one place the trainers and evaluators call torch.distributed.

NCCL only reduces CUDA tensors and HCCL only NPU tensors, so every tensor handed to a collective here is
first moved to the device the process group is bound to (``collective_device``); gloo gets CPU tensors. On
one process every function is the identity (no process group is needed).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist

# Test seam: when set, called with every tensor just before it is handed to a collective (see the tests that
# check the device of each collective's tensor under gloo, where the wrong device would not fail by itself).
observer: Optional[Callable[[str, torch.Tensor], None]] = None


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def collective_device() -> torch.device:
    """The device whose tensors the current process group's backend accepts."""
    backend = str(dist.get_backend()) if active() else "gloo"
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "hccl":
        return torch.device("npu", torch.npu.current_device())  # registered by torch_npu
    return torch.device("cpu")


def _on_group_device(name: str, t: torch.Tensor) -> torch.Tensor:
    t = t.to(collective_device())
    if observer is not None:
        observer(name, t)
    return t


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``, ``max`` or ``mean``) of ``t`` across ranks; returns ``t``."""
    if not active():
        return t
    x = _on_group_device("all_reduce", t)
    dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        x /= dist.get_world_size()
    if x is not t:
        t.copy_(x)
    return t


def mean_over_ranks(values: Mapping[str, Any]) -> Dict[str, float]:
    """Average a dict of scalars (floats or 0-d tensors) over ranks: one all-reduce, one host sync."""
    keys = sorted(values)
    if not keys:
        return {}
    parts = [v.detach().reshape(()).to(torch.float64) if isinstance(v, torch.Tensor)
             else torch.tensor(float(v), dtype=torch.float64) for v in (values[k] for k in keys)]
    device = collective_device() if active() else parts[0].device
    t = torch.stack([p.to(device) for p in parts])
    all_reduce_(t, "mean")
    return dict(zip(keys, t.tolist()))


def max_int_over_ranks(value: int) -> int:
    """The largest of one integer per rank (e.g. a received signal number), the same on every rank."""
    if not active():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    return int(all_reduce_(t, "max").item())


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``t`` concatenated in rank order, on every rank, on ``t``'s device.

    Ranks may hold different numbers of rows of one dtype; a rank with none may pass any empty tensor of the
    same number of dimensions (the trailing shape comes from the others, e.g. ``torch.zeros((0, 0))``).
    """
    if not active():
        return t
    world = dist.get_world_size()
    shape = _on_group_device("all_gather", torch.tensor(t.shape, dtype=torch.int64))
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes = [s.tolist() for s in shapes]
    rows = [s[0] for s in shapes]
    trailing = {tuple(s[1:]) for s in shapes if s[0] > 0}
    if len(trailing) > 1:
        raise ValueError(f"all_gather_rows: ranks hold rows of different shapes {sorted(trailing)}")
    if not trailing:
        return t
    padded = torch.zeros((max(rows), *trailing.pop()), dtype=t.dtype)  # all_gather needs equal sizes
    if len(t):
        padded[:len(t)] = t
    x = _on_group_device("all_gather", padded)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat([p[:n] for p, n in zip(parts, rows)]).to(t.device)


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)  # torch places its byte tensors on the group's current device itself
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank; on NCCL bound to this process's GPU (no guess of the device by rank)."""
    if not active():
        return
    dev = collective_device()
    if dev.type == "cuda":
        dist.barrier(device_ids=[dev.index])
    else:
        dist.barrier()
