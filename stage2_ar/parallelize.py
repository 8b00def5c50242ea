"""Parallelism and compilation of the AR model, applied from outside: the model code is single-device.

    model = FactorizedAR(cfg).to(device)
    if compile: compile_blocks(model)            # per block, in place: state_dict keys stay the official ones
    wrapped = wrap(model, "ddp" | "fsdp", info)  # the plain model on one device
    with no_sync(wrapped, parallel, info, sync=last_micro_batch): ...backward...

Checkpoints hold full (unsharded) tensors whatever the wrapping: ``full_weights`` and ``full_optimizer_state``
gather them (to CPU, for the writer); ``load_full_weights`` and ``load_optimizer_state`` hand them back to a
wrapped model. So an FSDP checkpoint is an ordinary one: it resumes under DDP as well.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Mapping

import torch
import torch.nn as nn

from shared.config import ConfigError
from shared.device import DistInfo
from stage2_ar.model import FactorizedAR

def _blocks(model: FactorizedAR):
    return list(model.inter) + list(model.intra)


def compile_blocks(model: FactorizedAR, **compile_kwargs) -> FactorizedAR:
    """``torch.compile`` every inter/intra block in place (before DDP/FSDP wrap them): the blocks are the
    FLOPs, state_dict keys stay the official ones, and per-block graphs compose with FSDP's per-block shards."""
    for block in _blocks(model):
        block.compile(**compile_kwargs)
    return model


def wrap(model: FactorizedAR, parallel: str, info: DistInfo) -> nn.Module:
    """DDP, or FSDP (per-block sharding) for the large presets; the plain model on one device."""
    if not info.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type in ("cuda", "npu") else None
        return DDP(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ConfigError(f"parallel must be ddp or fsdp, got {parallel!r}")


def no_sync(wrapped: nn.Module, parallel: str, info: DistInfo, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if not info.distributed or sync:
        if info.distributed and parallel == "fsdp":
            wrapped.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if parallel == "fsdp":
        wrapped.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return wrapped.no_sync()


def state_dict_options(saving: bool = True):
    """Full (unsharded) state dicts; when saving, gathered to CPU on rank 0 only (the writer)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=saving)


def full_weights(wrapped: nn.Module) -> Dict[str, torch.Tensor]:
    """Collective under FSDP: the full weights (shards gathered), on CPU."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(wrapped, options=state_dict_options())


def full_optimizer_state(wrapped: nn.Module, opt: torch.optim.Optimizer) -> Dict[str, Any]:
    """Collective under FSDP: the full optimiser state (shards gathered), on CPU."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, opt, options=state_dict_options())


def load_full_weights(wrapped: nn.Module, weights: Mapping[str, torch.Tensor], info: DistInfo) -> None:
    """Full weights into a (possibly wrapped and sharded) model that already matches them key for key and
    shape for shape (``shared.checkpoint.check_matches``)."""
    if not info.distributed:
        wrapped.load_state_dict(weights, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(wrapped, dict(weights), options=state_dict_options(saving=False))


def load_optimizer_state(wrapped: nn.Module, opt: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """A full optimiser state (``full_optimizer_state``) into the optimiser of a (possibly sharded) model."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(wrapped, opt, optim_state_dict=state, options=state_dict_options(saving=False))
