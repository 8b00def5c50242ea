"""Benchmark the dataprep Ray job against a plain single-process loop (same model, same images), and
measure bytes per token of both stores.

    python bench/encode_pipeline.py [--preset tokenizer-demo] [--images 96] [--resolution 64] [--actors 1]
                                    [--write-docs]

Reports images/s of (a) the loop: decode + crop + encode + pack in one process, batch by batch, and
(b) the Ray job end to end (Ray start, actor start, decode tasks, tokenizer actors, Lance + MDS writes,
commit, finalize) and its steady-state part (first commit to last commit), with the ratio job / loop.
Also checks the two give identical tokens. Bytes per token: the job's dataset (real tokens), and a
worst case of uniformly random tokens (incompressible) written through the same writers.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import platform
import re
import shutil
import tempfile
import time

import numpy as np
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "dataprep.md"
BEGIN, END = "<!-- bench:encode_pipeline:begin -->", "<!-- bench:encode_pipeline:end -->"


def loop_baseline(tok, listing, data, resolution, views, batch, chunk):
    """The plain loop: same groups (batch composition) as the job, one process, no Ray."""
    from dataprep import images
    from dataprep.listing import chunk_ranges, groups
    from shared.token_dataset import row_id
    from shared.tokens import pack_tokens

    out = {}
    t0 = time.perf_counter()
    for lo, hi in chunk_ranges(len(listing.items), chunk):
        for group in groups(listing.items[lo:hi], batch):
            ok, crops = [], []
            for it in group:
                try:
                    crops.append(images.load_views(data / it.path, resolution, views))
                    ok.append(it)
                except images.BadImage:
                    pass
            if not ok:
                continue
            t = tok.encode(images.to_model_input(np.concatenate(crops))).reshape(len(ok) * len(views), -1)
            for i, it in enumerate(ok):
                for v in range(len(views)):
                    out[row_id("train", it.index, v)] = pack_tokens(t[i * len(views) + v]).tobytes()
    return time.perf_counter() - t0, out


def worst_case_bytes(tmp: Path, rows: int, grid=(16, 16)):
    """Bytes/token of both stores for uniformly random 18-bit tokens (nothing to compress)."""
    from dataprep import encode, state
    from shared import token_dataset as td
    from shared.token_dataset import TokenDataset
    from shared.token_dataset.manifest import producer_settings
    from shared.token_dataset.writer import lance_schema
    from shared.tokens import pack_tokens

    rng = np.random.default_rng(0)
    root = tmp / "uniform"
    root.mkdir()
    settings = producer_settings(tokenizer={"preset": "uniform-random", "config": {}, "checkpoint_sha256": "0" * 64},
                                 resolution=256, views=["center", "flip"], grid=grid, bits_per_token=18,
                                 subtoken_bits=[6, 12], classes=[str(i) for i in range(1000)], precision="fp32")
    st = state.State.new(root, settings)
    st.start_split("train", {"num_images": rows // 2})
    n = grid[0] * grid[1]
    schema = lance_schema(td.Packing(18, n), settings)
    synsets = sorted({f"n{rng.integers(10**7, 10**8):08d}" for _ in range(1000)})[:100]
    per_class = -(-rows // 2 // len(synsets))
    recs = []
    for i in range(rows):  # a sorted ImageNet-like listing: train/<synset>/<synset>_<number>.JPEG, 2 views
        img = i // 2
        label = img // per_class
        s, number = synsets[label], 1 + (img % per_class) * 7 + int(rng.integers(0, 7))
        recs.append({"index": img, "id": td.row_id("train", img, i % 2), "label": label,
                     "path": f"train/{s}/{s}_{number}.JPEG", "view": i % 2, "error": "",
                     "tokens": pack_tokens(rng.integers(0, 1 << 18, n)).tobytes()})
    for c, lo in enumerate(range(0, rows, 8192)):
        encode.commit_chunk(root, st, "train", c, recs[lo:lo + 8192], len(recs[lo:lo + 8192]) // 2, schema, 2)
    encode.finalize(root, st, "train")
    return TokenDataset(root).bytes_per_token()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tokenizer-demo")
    p.add_argument("--images", type=int, default=640)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--uniform-rows", type=int, default=40000)
    p.add_argument("--write-docs", action="store_true", help=f"write the results into {DOC.name}")
    args = p.parse_args()

    from dataprep import encode, images, listing as ls
    from dataprep.sample_images import image_folder
    from shared.token_dataset import TokenDataset
    from stage1_tokenizer.config import PRESETS
    from stage1_tokenizer.tokenizer import Tokenizer

    torch.set_num_threads(1)  # the loop gets one core, like one actor
    tmp = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    try:
        data = tmp / "data"
        per_class = -(-args.images // 4)
        image_folder(data, classes=4, per_class=per_class)
        torch.manual_seed(0)
        Tokenizer(PRESETS[args.preset]).save(tmp / "ckpt")
        tok = Tokenizer.from_checkpoint(tmp / "ckpt")
        listing = ls.scan_folder(data, "train")
        views = images.expand_views("center,flip")
        n = len(listing.items)
        loop_s, loop_tokens = loop_baseline(tok, listing, data, args.resolution, views, args.batch_size,
                                            args.chunk_size)

        out = tmp / "ds"
        t0 = time.perf_counter()
        encode.main(["--data", str(data), "--tokenizer", str(tmp / "ckpt"), "--out", str(out),
                     "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
                     "--chunk-size", str(args.chunk_size), "--actors", str(args.actors),
                     "--num-cpus", str(args.num_cpus), "--object-store-mb", "300"])
        job_s = time.perf_counter() - t0
        ds = TokenDataset(out)
        chunks = json.loads((out / "state.json").read_text())["splits"]["train"]["chunks"]
        stamps = sorted((v["committed_at"], v["images"]) for v in chunks.values())
        # Steady state: the second half of the chunks. Decode tasks run ahead while the actors start, so
        # the first commits arrive in a burst; by the middle the backlog is gone.
        half = len(stamps) // 2
        steady = (sum(n for _, n in stamps[half + 1:]) / max(stamps[-1][0] - stamps[half][0], 1e-9)
                  if len(stamps) >= 4 else float("nan"))
        rows = ds.read_lance()
        from shared.tokens import pack_tokens

        same = all(pack_tokens(rows["tokens"][i].reshape(-1)).tobytes() == loop_tokens[rid]
                   for i, rid in enumerate(rows["id"])) and len(rows["id"]) == len(loop_tokens)
        bpt = ds.bytes_per_token()
        worst = worst_case_bytes(tmp, args.uniform_rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    loop_rate, job_rate = n / loop_s, n / job_s
    lines = [
        f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU, shared with "
        f"other jobs; torch {torch.__version__}, 1 thread per tokenizer (loop and each actor).",
        f"Workload: {n} real photos (scikit-image crops, JPEG) x 2 views at {args.resolution}px, "
        f"{args.preset} random init, batch {args.batch_size} images, chunk {args.chunk_size} images, "
        f"{args.actors} actor(s), Ray with {args.num_cpus} CPUs.",
        "",
        "| pipeline | seconds | images/s | ratio vs loop |",
        "|---|---|---|---|",
        f"| single-process loop (decode+crop+encode+pack) | {loop_s:.1f} | {loop_rate:.2f} | 1.00 |",
        f"| Ray job end to end (start Ray, actors, write, commit, finalize) | {job_s:.1f} | {job_rate:.2f} | "
        f"{job_rate / loop_rate:.2f} |",
        f"| Ray job steady state (second half of the chunk commits) | - | {steady:.2f} | {steady / loop_rate:.2f} |",
        "",
        f"Tokens identical between loop and job: {same}.",
        "",
        "| store | bytes/token, this dataset (real tokens) | bytes/token, worst case (uniform random tokens, "
        f"{args.uniform_rows} rows of 256) |",
        "|---|---|---|",
        f"| Lance | {bpt['lance']['bytes_per_token']:.3f} | {worst['lance']['bytes_per_token']:.3f} |",
        f"| MDS | {bpt['mds']['bytes_per_token']:.3f} | {worst['mds']['bytes_per_token']:.3f} |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        doc = DOC.read_text()
        block = f"{BEGIN}\n{text}\n{END}"
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S) if BEGIN in doc \
            else doc.rstrip() + "\n\n" + block + "\n"
        DOC.write_text(doc)
        print(f"wrote {DOC}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
