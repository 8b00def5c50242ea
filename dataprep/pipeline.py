"""The Ray Data part of the job: groups of images -> decode/crop (CPU tasks) -> tokenizer (actor pool).

One dataset row is one *group*: ``batch_size`` consecutive images of a chunk, which the tokenizer
encodes in one forward pass. Keeping the group as the unit (rather than letting Ray re-batch rows) makes
the batch each image is encoded in a pure function of the inputs, so a resumed run reproduces the
tokens of an uninterrupted one bit for bit.
"""
from __future__ import annotations

import io
import json
import os
import socket
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from dataprep import images as imgs
from dataprep.listing import Item, resolve
from shared import object_store as store
from shared.token_dataset import Packing, row_id

# Columns of the tokenizer stage's output: one row per (image, view), or one row per failed image
# (view -1, empty tokens, the reason in ``error``).
OUT_SCHEMA = pa.schema([
    ("chunk", pa.int64()), ("index", pa.int64()), ("id", pa.string()), ("path", pa.string()),
    ("label", pa.int64()), ("view", pa.int64()), ("tokens", pa.binary()), ("error", pa.string()),
])


def group_rows(split: str, chunk: int, groups: Sequence[Sequence[Item]]) -> List[Dict[str, Any]]:
    return [{"split": split, "chunk": chunk,
             "items": json.dumps([[it.index, it.path, it.label, it.reason] for it in g])} for g in groups]


def _blobs(row: Dict[str, Any]) -> Optional[List[Optional[bytes]]]:
    """The encoded images a shard read task put in the row (None for a row of image paths)."""
    sizes = row.get("sizes")
    if sizes is None:
        return None
    data, out, pos = row["data"], [], 0
    for n in json.loads(sizes):
        out.append(None if n < 0 else bytes(data[pos:pos + n]))
        pos += max(n, 0)
    return out


def _image_file(root: Optional[str], path: str):
    """A listed image as what PIL opens: a local path, or the bytes of an object of an s3:// folder."""
    full = resolve(root, path)
    if not store.is_s3(full):
        return full
    data = store.get_bytes(full)  # a store error fails the task (Ray retries it), it is not the image's fault
    if data is None:
        raise imgs.BadImage("file not found")
    return io.BytesIO(data)


def decode_group(row: Dict[str, Any], root: Optional[str], resolution: int, views: List[str],
                 endpoint: Optional[str] = None) -> Dict[str, Any]:
    """Decode and crop every image of a group, from files (a folder, a file list) or from the bytes a shard
    read task gave (``dataprep.sources.shards.read_chunk``); failures are kept as (index, reason), never raised."""
    if endpoint:
        store.configure(endpoint)
    items = json.loads(row["items"])
    blobs = _blobs(row)
    ok, crops, errors = [], [], []
    for k, (index, path, label, reason) in enumerate(items):
        if reason:  # known unusable from the listing or the read task (a name not UTF-8, a missing label, ...)
            errors.append([index, path, label, reason])
            continue
        try:
            src = io.BytesIO(blobs[k]) if blobs is not None else _image_file(root, path)
            crops.append(imgs.load_views(src, resolution, views))
            ok.append([index, path, label])
        except imgs.BadImage as e:
            errors.append([index, path, label, str(e)])
    pixels = np.concatenate(crops).tobytes() if crops else b""
    return {"split": row["split"], "chunk": row["chunk"], "ok": json.dumps(ok), "errors": json.dumps(errors),
            "pixels": pixels}


def pick_device(accelerators: float) -> str:
    """The torch device kind of an actor given ``accelerators`` (Ray GPUs or NPUs): the accelerator
    ``shared.device`` finds (CUDA, else Ascend NPU), or 'cpu' when none was asked for. An actor that was
    given accelerators but sees none fails loudly rather than encoding on its CPU."""
    from shared.device import accelerator_name

    if accelerators <= 0:
        return "cpu"
    name = accelerator_name()
    if name is None:
        raise RuntimeError(f"this tokenizer actor was given {accelerators:g} accelerators but torch sees no CUDA "
                           "device and no Ascend NPU (torch_npu)")
    return name


class TokenizerActor:
    """Ray Data callable class: loads the tokenizer once per actor, encodes one group per call."""

    def __init__(self, checkpoint: str, resolution: int, views: List[str], bits: int, precision: str = "fp32",
                 accelerators: float = 0.0, threads: int = 1, compile: bool = False):
        import torch

        from stage1_tokenizer.tokenizer import Tokenizer

        self.device = pick_device(accelerators)
        if self.device == "cpu":
            torch.set_num_threads(max(1, threads))
        # channels_last: the same tokens as NCHW fp32 (tested), faster convolutions; encode runs in inference mode
        self.tok = Tokenizer.from_checkpoint(checkpoint, device=self.device).channels_last()
        if compile:  # once per actor; the same tokens, worth it on accelerators for long jobs
            self.tok.encoder.compile()
        self.resolution, self.views, self.bits, self.precision = resolution, list(views), bits, precision

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
            packing = Packing(self.bits, tokens.shape[1]) if ok else None
            for i, (index, path, label) in enumerate(ok):
                for v in range(len(self.views)):
                    packed = packing.encode(tokens[i * len(self.views) + v])
                    add(chunk=int(chunk), index=index, id=row_id(split, index, v), path=path, label=label,
                        view=v, tokens=packed, error="")
            for index, path, label, reason in json.loads(err_json):
                add(chunk=int(chunk), index=index, id=row_id(split, index, -1), path=path, label=label, view=-1,
                    tokens=b"", error=reason)
        return pa.table(out, schema=OUT_SCHEMA)


def build(rows: List[Dict[str, Any]], *, root: Optional[str], checkpoint: str, resolution: int, views: List[str],
          bits: int, actors: int, accelerators: float, cpus_per_actor: float, precision: str,
          resource: Optional[str] = "GPU", decode_cpus: float = 1.0, compile: bool = False,
          read: Optional[Dict[str, Any]] = None, read_cpus: float = 0.5):
    """The lazy Ray dataset of tokenized rows for the given groups (executed by iterating it).

    ``accelerators`` per actor are of the Ray resource ``resource`` ("GPU", or "NPU" on Ascend clusters).
    ``read``: the rows are chunks of shards (``sources.work_rows``), read into groups first by
    ``read_chunk(**read)`` tasks (``read_cpus`` each: they mostly wait for I/O; a share unlike the decode
    tasks' also keeps Ray from fusing the two stages, so decoding runs group by group in parallel).
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # chunks finish in order: bounded buffering in the driver
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 20000)))
    if read is not None:
        from dataprep.sources.shards import read_chunk

        ds = ds.flat_map(read_chunk, fn_kwargs=read, num_cpus=read_cpus)
    ds = ds.map(decode_group, fn_kwargs={"root": root, "resolution": resolution, "views": views,
                                         "endpoint": store.endpoint() if root and store.is_s3(root) else None},
                num_cpus=decode_cpus)
    # Fractional CPUs for CPU actors: on a 2-CPU machine whole-CPU actors starve the decode tasks and the
    # pipeline deadlocks (see the stack notes).
    ds = ds.map_batches(
        TokenizerActor,
        fn_constructor_kwargs={"checkpoint": checkpoint, "resolution": resolution, "views": views, "bits": bits,
                               "precision": precision, "accelerators": accelerators,
                               "threads": max(1, int(round(cpus_per_actor))), "compile": compile},
        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, **actor_resources(accelerators, resource),
    )
    return ds


def actor_resources(accelerators: float, resource: Optional[str]) -> Dict[str, Any]:
    """Ray's arguments asking for ``accelerators`` of ``resource`` per actor (GPUs have their own one)."""
    if accelerators <= 0:
        return {}
    return {"num_gpus": accelerators} if resource == "GPU" else {"resources": {resource: accelerators}}


ACCELERATOR_RESOURCES = ("GPU", "NPU")  # Ray's names: CUDA GPUs, Ascend NPUs (Ray detects both)


def accelerator_resource(resources: Dict[str, float]) -> Optional[str]:
    """The Ray resource the tokenizer actors' accelerators are: GPU if the cluster has any, else NPU."""
    return next((name for name in ACCELERATOR_RESOURCES if resources.get(name, 0) > 0), None)


def check_resources(resources: Dict[str, float], actors: int, cpus_per_actor: float, gpus_per_actor: float) -> None:
    """Refuse a pool that can never be scheduled, or that leaves no CPU to decode (it would hang)."""
    total_cpu = resources.get("CPU", 0.0)
    if gpus_per_actor > 0:
        name = accelerator_resource(resources)
        have = resources.get(name, 0.0) if name else 0.0
        if actors * gpus_per_actor > have:
            raise ValueError(f"{actors} actors x {gpus_per_actor:g} accelerators need {actors * gpus_per_actor:g} "
                             f"{name or 'GPU'}s, the cluster has {have:g}"
                             + ("" if name else " (and no Ascend NPU)"))
    if actors * cpus_per_actor > total_cpu - 1:
        raise ValueError(f"{actors} actors x {cpus_per_actor} CPUs leave less than 1 of the cluster's "
                         f"{total_cpu:g} CPUs for decoding: use fewer actors or --cpus-per-actor")


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """ConnectionError unless something accepts connections at a ``host:port`` (or ``ray://host:port``)
    cluster address: ``ray.init`` would otherwise retry an unreachable one for ever."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not (host and port.isdigit()):
        return  # "auto" and the like: Ray resolves them itself, and fails fast
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {address} ({e.strerror or type(e).__name__})") from None


def init_ray(address: Optional[str], num_cpus: Optional[int], object_store_mb: Optional[int], log) -> str:
    """Connect to a cluster (``--address`` or RAY_ADDRESS, as under ``ray job submit``) or start a local one."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
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
