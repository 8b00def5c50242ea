"""Encode an image dataset into token datasets (Lance + MDS) with a Ray job; resumable, exactly once.

    python dataprep/encode.py --data ROOT --split train --tokenizer CKPT --out DATASET --resolution 256
    python -m dataprep.encode  ... (same arguments)
    ray job submit --working-dir . -- python dataprep/encode.py ... (against a running cluster)

Work is cut into chunks of --chunk-size images. A chunk is committed by writing its MDS sub-directory,
appending its rows to the Lance table and then recording it in state.json (atomically, last). Running
the same command again after a crash drops whatever was not recorded and finishes the rest; on a
finished split it does nothing. Other settings or another tokenizer on an existing dataset are refused.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: Python put dataprep/ first on sys.path, where inspect.py would shadow the standard
    # library module for every later import (torch, ray). Swap it for the repository root, which also
    # makes the packages importable here and in Ray workers (they inherit the driver's sys.path).
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import logging
import os
import time
from typing import Any, Dict, List, Optional

from dataprep import manifest as mf
from dataprep import state as st
from dataprep import writers as wr
from dataprep.images import expand_views
from shared import atomic


def _logger() -> logging.Logger:
    # Plain logging (shared.runlog would import torch before the arguments are even checked).
    log = logging.getLogger("dataprep")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s dataprep: %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.propagate = False
        log.setLevel(logging.INFO)
    return log


log = _logger()
CRASH_ENV = "DATAPREP_CRASH"  # test hook "K:point": exit hard while committing the K-th chunk of this run
CRASH_POINTS = ("mds", "lance", "state")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="image root: ROOT/<split>/<class>/<image>, or the base of --file-list paths")
    p.add_argument("--file-list", help="TSV of path<TAB>label (paths relative to --data, or absolute)")
    p.add_argument("--split", default="train")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint directory")
    p.add_argument("--out", required=True, help="dataset directory")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--views", default="center,flip", help="comma list of center, flip, tencrop")
    p.add_argument("--batch-size", type=int, default=32, help="images per tokenizer forward (x views crops)")
    p.add_argument("--chunk-size", type=int, default=4096, help="images per commit")
    p.add_argument("--actors", type=int, default=1, help="tokenizer actors")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--cpus-per-actor", type=float, default=None,
                   help="default 1 with GPUs, else 0.5 (fractional: leaves CPUs to the decode tasks)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 is faster on GPUs but may flip bits whose latent is near 0")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--object-store-mb", type=int, help="object store of the local Ray instance")
    return p.parse_args(argv)


def tokenizer_provenance(ckpt: Path) -> Dict[str, Any]:
    from shared.checkpoint import CheckpointError, load_meta

    try:
        meta = load_meta(ckpt)
    except (CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"error: --tokenizer {ckpt}: {e}")
    if meta.get("kind") != "tokenizer":
        raise SystemExit(f"error: --tokenizer {ckpt} holds a {meta.get('kind')!r} checkpoint, not a tokenizer")
    cfg = meta["config"]
    return {"preset": cfg.get("preset", "custom"), "config": cfg,
            "checkpoint_sha256": st.sha256_file(ckpt / "model.safetensors")}


def settings_for(args, tok: Dict[str, Any], classes: List[str], views: List[str]) -> Dict[str, Any]:
    """Everything that decides token values and the row layout; must match to append or resume."""
    from shared.config import from_dict
    from shared.tokens import DEFAULT_SPLIT
    from stage1_tokenizer.config import TokenizerConfig

    cfg = from_dict(TokenizerConfig, tok["config"])
    try:
        grid = list(cfg.latent_shape(args.resolution, args.resolution))
    except ValueError as e:
        raise SystemExit(f"error: --resolution {args.resolution}: {e}")
    return {
        "format": st.FORMAT, "version": st.VERSION, "tokenizer": tok, "resolution": args.resolution,
        "views": views, "grid": grid, "bits_per_token": cfg.z_channels, "bit_order": "little-endian-channel",
        "subtoken_bits": list(DEFAULT_SPLIT), "classes": classes, "precision": args.precision,
    }


def _maybe_crash(n_committed: int, point: str) -> None:
    spec = os.environ.get(CRASH_ENV)
    if spec:
        k, where = spec.split(":")
        if n_committed + 1 == int(k) and where == point:
            sys.stderr.write(f"{CRASH_ENV}: exiting hard at chunk {k} after '{point}'\n")
            sys.stderr.flush()
            os._exit(17)


def recover(root: Path, state: st.State, split: str) -> None:
    """Drop whatever a killed run wrote past the last commit (Lance versions, MDS chunk directories)."""
    store = wr.LanceStore(root)
    if store.rollback(state.lance_version):
        log.info(f"rolled {wr.LANCE_DIR} back to committed version {state.lance_version}")
    removed = wr.remove_stray_mds(root, split, list(state.committed(split)))
    if removed:
        log.info(f"removed uncommitted MDS chunk directories: {', '.join(sorted(removed))}")


def commit_chunk(root: Path, state: st.State, split: str, chunk: int, rows: List[Dict[str, Any]],
                 n_images: int, schema, n_done: int) -> Dict[str, Any]:
    rows.sort(key=lambda r: (r["index"], r["view"]))
    good = [r for r in rows if r["view"] >= 0]
    failures = [[r["path"], r["error"]] for r in rows if r["view"] < 0]
    per_class: Dict[str, int] = {}
    for r in good:
        if r["view"] == 0:
            per_class[str(r["label"])] = per_class.get(str(r["label"]), 0) + 1
    wr.write_mds_chunk(root, split, chunk, good)
    _maybe_crash(n_done, "mds")
    table_rows = [{**r, "split": split} for r in good]
    version = wr.LanceStore(root).append(wr.rows_table(table_rows, schema)) if good else state.lance_version
    _maybe_crash(n_done, "lance")
    info = {"images": n_images, "encoded": n_images - len(failures), "rows": len(good), "failures": failures,
            "per_class": per_class, "committed_at": round(time.time(), 3)}
    state.commit_chunk(split, chunk, info, version)
    _maybe_crash(n_done, "state")
    return info


def finalize(root: Path, state: st.State, split: str) -> Dict[str, Any]:
    committed = sorted(state.committed(split))
    wr.merge_mds(root, split, committed)
    fails = [(split, p, reason) for c in committed for p, reason in state.committed(split)[c]["failures"]]
    atomic.write_text(root / f"failures-{split}.tsv",
                      "split\tpath\treason\n" + "".join(f"{s}\t{p}\t{r}\n" for s, p, r in fails))
    store = wr.LanceStore(root)
    if store.exists():
        version = store.compact()
        state.data["lance_version"] = version  # recorded before old versions are dropped
    state.data["splits"][split]["complete"] = True
    state.save()
    if store.exists():
        store.cleanup()
    return st.write_manifest(root, state, {})


def run(args) -> int:
    t0 = time.time()
    if args.batch_size < 1 or args.chunk_size < 1 or args.actors < 1:
        raise SystemExit("error: --batch-size, --chunk-size and --actors must be positive")
    if args.resolution < 1:
        raise SystemExit("error: --resolution must be positive")
    try:
        views = expand_views(args.views)
    except ValueError as e:
        raise SystemExit(f"error: --views: {e}")
    ckpt = Path(args.tokenizer)
    if not ckpt.is_dir():
        raise SystemExit(f"error: --tokenizer {ckpt} is not a checkpoint directory")
    root = Path(args.out)
    # Relative paths of a file list are taken from --data, else from the list's own folder; either way
    # absolute here, because Ray workers do not share the driver's working directory.
    base = args.data or (Path(args.file_list).parent if args.file_list else None)
    data = Path(base).resolve() if base else None
    try:
        if args.file_list:
            listing = mf.read_file_list(args.file_list)
        elif data is not None:
            listing = mf.scan_folder(data, args.split)
        else:
            raise SystemExit("error: give --data (an image root) or --file-list")
    except (mf.ManifestError, OSError) as e:
        raise SystemExit(f"error: {e}")
    if not listing.items:
        raise SystemExit(f"error: split {args.split!r} lists no images")

    tok = tokenizer_provenance(ckpt)
    settings = settings_for(args, tok, listing.classes, views)
    run_settings = {"num_images": len(listing.items), "listing_sha256": listing.sha256(),
                    "chunk_size": args.chunk_size, "batch_size": args.batch_size,
                    "source": "file-list" if args.file_list else "folder"}
    root.mkdir(parents=True, exist_ok=True)
    with st.Lock(root):
        state = st.State.load(root)
        if state is None:
            if any(p.name not in (st.LOCK,) for p in root.iterdir()):
                raise SystemExit(f"error: {root} is not empty and holds no token dataset")
            state = st.State.new(root, settings)
            state.data["created"] = st.now_iso()
            state.save()
        try:
            state.check_settings(settings)
            split_rec = state.start_split(args.split, run_settings)
        except st.ProvenanceError as e:
            raise SystemExit(f"error: {e}")
        if split_rec["complete"]:
            c = st.write_manifest(root, state, {})["counts"][args.split]
            print(f"split {args.split!r} of {root} is already complete ({c['encoded_images']} encoded, "
                  f"{c['failed_images']} failed): nothing to do")
            return 0
        recover(root, state, args.split)
        state.data["tokenizer_path"] = str(ckpt.resolve())

        chunks = mf.chunk_ranges(len(listing.items), args.chunk_size)
        done = state.committed(args.split)
        todo = [c for c in range(len(chunks)) if c not in done]
        skipped = sum(chunks[c][1] - chunks[c][0] for c in done)
        log.info(f"split {args.split!r}: {len(listing.items)} images in {len(chunks)} chunks; "
                 f"{len(done)} already committed ({skipped} images skipped), {len(todo)} to do")
        encoded = failed = 0
        if todo:
            encoded, failed = encode_chunks(args, root, state, listing, chunks, todo, settings, views, data)
        manifest = finalize(root, state, args.split)
        c = manifest["counts"][args.split]
        print(f"done in {time.time() - t0:.1f}s: split {args.split!r} encoded {encoded}, failed {failed}, "
              f"skipped {skipped} (already committed); dataset total {c['encoded_images']} encoded, "
              f"{c['failed_images']} failed, {c['rows']} rows; listing ignored {listing.ignored} non-image files")
    return 0


def encode_chunks(args, root, state, listing, chunks, todo, settings, views, data):
    import ray

    from dataprep import pipeline
    from shared.tokens import packed_nbytes

    mode = pipeline.init_ray(args.address, args.num_cpus, args.object_store_mb, log)
    gpus = args.gpus_per_actor
    cpus = args.cpus_per_actor if args.cpus_per_actor is not None else (1.0 if gpus > 0 else 0.5)
    try:
        pipeline.check_resources(ray.cluster_resources(), args.actors, cpus, gpus)
    except ValueError as e:
        if mode == "local":
            ray.shutdown()
        raise SystemExit(f"error: {e}")
    grid = settings["grid"]
    bits = settings["bits_per_token"]
    schema = wr.lance_schema(packed_nbytes(grid[0] * grid[1], bits), settings)
    rows = []
    for c in todo:
        lo, hi = chunks[c]
        rows += pipeline.group_rows(args.split, c, mf.groups(listing.items[lo:hi], args.batch_size))
    ds = pipeline.build(rows, root=str(data) if data else None, checkpoint=str(Path(args.tokenizer).resolve()),
                        resolution=args.resolution, views=views, bits=bits, actors=args.actors,
                        gpus_per_actor=gpus, cpus_per_actor=cpus, precision=args.precision)
    pending: Dict[int, Dict[str, Any]] = {c: {"rows": [], "seen": set()} for c in todo}
    n_done = encoded = failed = 0
    t0 = time.time()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for r in batch.to_pylist():
                p = pending[r["chunk"]]
                p["rows"].append(r)
                p["seen"].add(r["index"])
            for c in [c for c, p in pending.items() if len(p["seen"]) == chunks[c][1] - chunks[c][0]]:
                p = pending.pop(c)
                info = commit_chunk(root, state, args.split, c, p["rows"], chunks[c][1] - chunks[c][0], schema,
                                    n_done)
                n_done += 1
                encoded += info["encoded"]
                failed += len(info["failures"])
                rate = (encoded + failed) / max(time.time() - t0, 1e-9)
                log.info(f"chunk {c + 1}/{len(chunks)} committed: {info['encoded']} encoded, "
                         f"{len(info['failures'])} failed ({n_done}/{len(todo)} this run, {rate:.1f} images/s)")
    except ray.exceptions.RayError as e:
        # Committed chunks stay committed: running the same command again resumes after them.
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise SystemExit(f"error: the Ray pipeline failed after {n_done} committed chunks "
                         f"({type(e).__name__}: {first[:300]}); run the same command to resume")
    finally:
        if mode == "local":
            ray.shutdown()
    if pending:
        raise SystemExit(f"error: the pipeline ended with {len(pending)} chunks incomplete; run again to resume")
    return encoded, failed


def main(argv: Optional[List[str]] = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
