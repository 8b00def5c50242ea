"""The Ray Data part of the job: groups of images -> decode/crop (CPU tasks) -> tokenizer (actor pool).

One dataset row is one *group*: ``batch_size`` consecutive images of a chunk, which the tokenizer
encodes in one forward pass. Keeping the group as the unit (rather than letting Ray re-batch rows) makes
the batch each image is encoded in a pure function of the inputs, so a resumed run reproduces the
tokens of an uninterrupted one bit for bit.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from dataprep import images as imgs
from dataprep.manifest import Item, resolve, row_id

# Columns of the tokenizer stage's output: one row per (image, view), or one row per failed image
# (view -1, empty tokens, the reason in ``error``).
OUT_SCHEMA = pa.schema([
    ("chunk", pa.int64()), ("index", pa.int64()), ("id", pa.string()), ("path", pa.string()),
    ("label", pa.int64()), ("view", pa.int64()), ("tokens", pa.binary()), ("error", pa.string()),
])


def group_rows(split: str, chunk: int, groups: Sequence[Sequence[Item]]) -> List[Dict[str, Any]]:
    return [{"split": split, "chunk": chunk, "items": json.dumps([[it.index, it.path, it.label] for it in g])}
            for g in groups]


def decode_group(row: Dict[str, Any], root: Optional[str], resolution: int, views: List[str]) -> Dict[str, Any]:
    """Decode and crop every image of a group; failures are kept as (index, reason), never raised."""
    items = json.loads(row["items"])
    ok, crops, errors = [], [], []
    for index, path, label in items:
        try:
            crops.append(imgs.load_views(resolve(root, path), resolution, views))
            ok.append([index, path, label])
        except imgs.BadImage as e:
            errors.append([index, path, label, str(e)])
    pixels = np.concatenate(crops).tobytes() if crops else b""
    return {"split": row["split"], "chunk": row["chunk"], "ok": json.dumps(ok), "errors": json.dumps(errors),
            "pixels": pixels}


def pick_device(num_gpus: float) -> str:
    import torch

    if num_gpus > 0 and torch.cuda.is_available():
        return "cuda"
    return "cpu"


class Encoder:
    """Ray Data callable class: loads the tokenizer once per actor, encodes one group per call."""

    def __init__(self, checkpoint: str, resolution: int, views: List[str], bits: int, precision: str = "fp32",
                 num_gpus: float = 0.0, threads: int = 1):
        import torch

        from shared.tokens import pack_tokens
        from stage1_tokenizer.tokenizer import Tokenizer

        if pick_device(num_gpus) == "cpu":
            torch.set_num_threads(max(1, threads))
        self.device = pick_device(num_gpus)
        self.tok = Tokenizer.from_checkpoint(checkpoint, device=self.device)
        self.resolution, self.views, self.bits, self.precision = resolution, list(views), bits, precision
        self.pack = pack_tokens

    def encode_pixels(self, pixels: bytes, n_images: int) -> np.ndarray:
        """(n_images * V, R, R, 3) uint8 bytes -> (n_images * V, h * w) int64 tokens, one forward pass."""
        r, v = self.resolution, len(self.views)
        crops = np.frombuffer(pixels, dtype=np.uint8).reshape(n_images * v, r, r, 3)
        x = imgs.to_model_input(crops).to(self.device)
        return self.tok.encode(x, precision=self.precision).reshape(n_images * v, -1).cpu().numpy()

    def __call__(self, batch: Dict[str, np.ndarray]) -> pa.Table:
        out: Dict[str, list] = {name: [] for name in OUT_SCHEMA.names}

        def add(**kw):
            for k, val in kw.items():
                out[k].append(val)

        for split, chunk, ok_json, err_json, pixels in zip(batch["split"], batch["chunk"], batch["ok"],
                                                            batch["errors"], batch["pixels"]):
            ok = json.loads(ok_json)
            tokens = self.encode_pixels(pixels, len(ok)) if ok else None
            for i, (index, path, label) in enumerate(ok):
                for v in range(len(self.views)):
                    packed = self.pack(tokens[i * len(self.views) + v], self.bits).tobytes()
                    add(chunk=int(chunk), index=index, id=row_id(split, index, v), path=path, label=label,
                        view=v, tokens=packed, error="")
            for index, path, label, reason in json.loads(err_json):
                add(chunk=int(chunk), index=index, id=row_id(split, index, -1), path=path, label=label, view=-1,
                    tokens=b"", error=reason)
        return pa.table(out, schema=OUT_SCHEMA)


def build(rows: List[Dict[str, Any]], *, root: Optional[str], checkpoint: str, resolution: int, views: List[str],
          bits: int, actors: int, gpus_per_actor: float, cpus_per_actor: float, precision: str,
          decode_cpus: float = 1.0):
    """The lazy Ray dataset of tokenized rows for the given groups (executed by iterating it)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # chunks finish in order: bounded buffering in the driver
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 20000)))
    ds = ds.map(decode_group, fn_kwargs={"root": root, "resolution": resolution, "views": views},
                num_cpus=decode_cpus)
    # Fractional CPUs for CPU actors: on a 2-CPU machine whole-CPU actors starve the decode tasks and the
    # pipeline deadlocks (see the stack notes).
    ds = ds.map_batches(
        Encoder,
        fn_constructor_kwargs={"checkpoint": checkpoint, "resolution": resolution, "views": views, "bits": bits,
                               "precision": precision, "num_gpus": gpus_per_actor,
                               "threads": max(1, int(round(cpus_per_actor)))},
        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
    )
    return ds


def check_resources(resources: Dict[str, float], actors: int, cpus_per_actor: float, gpus_per_actor: float) -> None:
    """Refuse a pool that can never be scheduled, or that leaves no CPU to decode (it would hang)."""
    total_cpu, total_gpu = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if gpus_per_actor > 0 and actors * gpus_per_actor > total_gpu:
        raise ValueError(f"{actors} actors x {gpus_per_actor} GPUs need {actors * gpus_per_actor} GPUs, "
                         f"the cluster has {total_gpu:g}")
    if actors * cpus_per_actor > total_cpu - 1:
        raise ValueError(f"{actors} actors x {cpus_per_actor} CPUs leave less than 1 of the cluster's "
                         f"{total_cpu:g} CPUs for decoding: use fewer actors or --cpus-per-actor")


def init_ray(address: Optional[str], num_cpus: Optional[int], object_store_mb: Optional[int], log) -> str:
    """Connect to a cluster (``--address`` or RAY_ADDRESS, as under ``ray job submit``) or start a local one."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info(f"connected to Ray cluster at {address}: {ray.cluster_resources()}")
        return "cluster"
    import psutil

    cpus = num_cpus or os.cpu_count() or 1
    # Cap the object store: by default Ray reserves ~30% of RAM, too much beside the tokenizer on a laptop.
    total = psutil.virtual_memory().total
    store = (object_store_mb << 20) if object_store_mb else int(min(total * 0.2, 8 << 30))
    # address="local": always a fresh instance, never silently joining another cluster on this machine.
    ray.init(address="local", num_cpus=cpus, object_store_memory=max(store, 80 << 20), include_dashboard=False,
             log_to_driver=True, configure_logging=False)
    log.info(f"started a local Ray instance: {cpus} CPUs, object store {store >> 20} MiB")
    return "local"
