"""Benchmark the sources of ``dataprep/encode.py``: the decode stage reading the same images from a folder,
Parquet files and WebDataset tars, on local disk and on S3, and the driver's memory for an ImageNet-size
listing of each.

    python bench/encode_sources.py [--images 192] [--resolution 256] [--repeats 3]

Decode stage: the functions the Ray tasks run (``sources.shards.read_chunk`` for shards, then
``pipeline.decode_group``: read, decode, crop both views), in one process and one thread, over the same
JPEGs (scikit-image photo crops) repacked by ``dataprep.repack``; images/s is the best of ``--repeats`` runs
and the ratio is against the local folder. Bytes read per image: the process's read bytes (``rchar``) on
disk, the bytes fetched by the object store client on S3 (the suite's moto server on 127.0.0.1: a local
Python server, so S3 rows measure this code's requests, not a real store's latency). Tokens identical across
sources is the tests' business (``tests/dataprep/test_dataprep_sources_job.py``), not measured here.

Driver memory: the listing structure of 1,281,167 images (ImageNet-1k train) built from synthesized metadata,
no images: the folder listing (one record per image, the same for an S3 folder) against the shard
listings (294 Parquet files as Hugging Face's imagenet-1k, 1,024 tars as timm's imagenet-1k-wds: one entry
per shard), each with the work rows the job builds for a fresh run (``sources.work_rows``), measured with
tracemalloc; and the size of the source record written to state.json / the manifest.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

IMAGENET_TRAIN, CLASSES, CHUNK, BATCH = 1_281_167, 1000, 4096, 32


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def decode_stage(listing, root, resolution, views):
    """Every image of the listing through the read and decode functions of the Ray tasks."""
    from dataprep import pipeline, sources
    from dataprep.listing import chunk_ranges
    from dataprep.sources import shards
    from shared import object_store as store

    chunks = chunk_ranges(listing.num_images, CHUNK)
    rows = sources.work_rows(listing, "train", chunks, range(len(chunks)), BATCH)
    read = sources.read_stage(listing)
    endpoint = store.endpoint() if root and store.is_s3(root) else None
    done = 0
    for row in rows:
        for group in (shards.read_chunk(row, **read) if read else [row]):
            out = pipeline.decode_group(group, root, resolution, views, endpoint)
            done += len(json.loads(out["ok"])) + len(json.loads(out["errors"]))
    return done


def list_source(kind, data, classes_file):
    from dataprep import listing as ls
    from dataprep.sources import folders, read_class_names, shards

    if kind == "folder":
        return str(data), (folders.scan_s3_folder(data, "train") if str(data).startswith("s3://")
                           else ls.scan_folder(data, "train"))
    names = read_class_names(classes_file) if kind == "webdataset" else None
    return None, shards.list_source(kind, data, {}, names_option=names)


def measure_sources(args, tmp: Path):
    from dataprep import repack
    from dataprep.images import expand_views
    from dataprep.sample_images import image_folder
    from shared import object_store as store

    folder = tmp / "folder"
    image_folder(folder, classes=8, per_class=args.images // 8)
    for fmt in ("parquet", "webdataset"):
        with contextlib.redirect_stdout(io.StringIO()):
            repack.main(["--folder", str(folder), "--split", "train", "--to", fmt, "--out", str(tmp / fmt),
                         "--shard-size", str(max(1, args.images // 4))])
    files = sorted(p for p in (folder / "train").rglob("*") if p.is_file())
    mean_jpeg = sum(p.stat().st_size for p in files) / len(files)
    local = {"folder": folder, "parquet": f"{tmp}/parquet/train-*.parquet",
             "webdataset": f"{tmp}/webdataset/train-{{0000..0003}}.tar"}
    views = expand_views("center,flip")
    try:  # the tests' moto server and S3 upload (where the test helpers are moving to, or where they are)
        from support.s3_server import BUCKET, moto_server
        from support.source_shards import upload_sources
    except ImportError:
        from s3_server import BUCKET, moto_server
        from source_shards import upload_sources
    with moto_server() as s3:
        os.environ.update({**s3.env(), "S3_ENDPOINT_URL": s3.url})
        os.environ.pop("AWS_PROFILE", None)
        upload_sources(f"s3://{BUCKET}", {"folder": folder, "parquet": tmp / "parquet", "webdataset": tmp / "webdataset"})
        remote = {"folder": f"s3://{BUCKET}/folder", "parquet": f"s3://{BUCKET}/parquet/train-*.parquet",
                  "webdataset": f"s3://{BUCKET}/webdataset/train-{{0000..0003}}.tar"}
        runs = [(where, kind, data[kind]) for where, data in (("disk", local), ("S3", remote))
                for kind in ("folder", "parquet", "webdataset")]
        decode_stage(list_source("folder", folder, "")[1], str(folder), args.resolution, views)  # warm-up
        best = {}
        for _ in range(args.repeats):  # round robin: the machine's other load falls on every source alike
            for where, kind, data in runs:
                t0 = time.perf_counter()
                root, listing = list_source(kind, data, str(tmp / "webdataset" / "classes.txt"))
                t_list = time.perf_counter() - t0
                r0, fetched = rchar(), store.read_counters["bytes"]
                t0 = time.perf_counter()
                n = decode_stage(listing, root, args.resolution, views)
                dt = time.perf_counter() - t0
                read = store.read_counters["bytes"] - fetched if where == "S3" else rchar() - r0
                if (where, kind) not in best or dt < best[(where, kind)][3]:
                    best[(where, kind)] = (where, kind, n, dt, t_list, read / max(n, 1))
    results = [(w, k, n, t_list, dt, per) for w, k, n, dt, t_list, per in best.values()]
    return results, mean_jpeg


def traced(build):
    """(result, bytes it holds) of ``build()`` under tracemalloc."""
    import gc

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    out = build()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return out, held


def listing_memory():
    """Driver memory of a 1.28 M-image listing in each format, from synthesized metadata."""
    from dataprep import sources
    from dataprep.listing import Item, Listing, chunk_ranges
    from dataprep.sources import patterns, shards

    per = [IMAGENET_TRAIN // CLASSES + (1 if c < IMAGENET_TRAIN % CLASSES else 0) for c in range(CLASSES)]
    chunks = chunk_ranges(IMAGENET_TRAIN, CHUNK)
    todo = range(len(chunks))
    rows = []

    def folder():
        items, i = [], 0
        for c, n in enumerate(per):
            wnid = f"n{1440764 + 7919 * c:08d}"
            for j in range(n):
                items.append(Item(i, f"train/{wnid}/{wnid}_{10026 + 37 * j}.JPEG", c))
                i += 1
        return Listing(items, [f"n{1440764 + 7919 * c:08d}" for c in range(CLASSES)], 0)

    def shard_listing(fmt, count, name):
        base, extra = divmod(IMAGENET_TRAIN, count)
        listed = [shards.ListedShard(patterns.Shard(name(k, count), f"s3://bucket/imagenet-1k/{name(k, count)}",
                                                    140_000_000, etag=f"{k:032x}"), base + (k < extra))
                  for k in range(count)]
        return shards.ShardListing(fmt, "s3://bucket/imagenet-1k/...", listed, [str(c) for c in range(CLASSES)],
                                   "--num-classes", {})

    builders = {
        "folder (disk or S3)": folder,
        "parquet, 294 files": lambda: shard_listing("parquet", 294, lambda k, n: f"train-{k:05d}-of-{n:05d}.parquet"),
        "webdataset, 1024 tars": lambda: shard_listing("webdataset", 1024, lambda k, n: f"imagenet1k-train-{k:04d}.tar"),
    }
    out = []
    for name, build in builders.items():
        t0 = time.perf_counter()
        listing, held = traced(build)
        rows, held_rows = traced(lambda: sources.work_rows(listing, "train", chunks, todo, BATCH))
        record = len(json.dumps(listing.record())) if hasattr(listing, "record") else 0
        out.append((name, listing.num_images, held, held_rows, record, time.perf_counter() - t0))
        del listing, rows
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-sources-") as tmp:
        results, mean_jpeg = measure_sources(a, Path(tmp))
    memory = listing_memory()

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, shared with other jobs; one process, one thread.")
    print(f"Decode stage: {results[0][2]} JPEG photo crops (mean {mean_jpeg / 1024:.1f} KiB), views center+flip at "
          f"{a.resolution}px, groups of {BATCH}, best of {a.repeats}; S3 = a moto server on 127.0.0.1.\n")
    print("| source | where | listing s | decode stage s | images/s | ratio vs local folder | bytes read / image |")
    print("|---|---|---|---|---|---|---|")
    ref = results[0][2] / results[0][4]
    for where, kind, n, t_list, dt, per_image in results:
        print(f"| {kind} | {where} | {t_list:.2f} | {dt:.2f} | {n / dt:.1f} | {n / dt / ref:.2f} | "
              f"{per_image / 1024:.1f} KiB |")
    print(f"\nDriver memory for {IMAGENET_TRAIN:,} listed images (synthesized ImageNet-1k train metadata; "
          f"chunks of {CHUNK}, groups of {BATCH}):\n")
    print("| format | images | listing | work rows of a fresh run | source record (state.json, manifest) |")
    print("|---|---|---|---|---|")
    for name, n, held, held_rows, record, _ in memory:
        print(f"| {name} | {n:,} | {held / 2**20:.1f} MiB | {held_rows / 2**20:.1f} MiB | "
              f"{f'{record / 1024:.0f} KiB' if record else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
