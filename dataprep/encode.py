"""Encode an image dataset into token datasets (Lance + MDS) with a Ray job; resumable, exactly once.

    python dataprep/encode.py --data ROOT --split train --tokenizer REF --out DATASET --resolution 256
    python -m dataprep.encode  ... (same arguments)

--tokenizer REF: a checkpoint directory, a Stage-1 run, an official .ckpt or hf://ORG/REPO[/FILE][@REV]
(``shared.model_ref``; an official file is converted once, before the job, and the job loads the result).
    ray job submit --working-dir . -- "$PWD/.venv/bin/python" dataprep/encode.py ... (a running cluster)

Everything a user gives is checked before anything is written and before Ray starts: the arguments, the
input listing, and the tokenizer, which is loaded here once. Work is cut into chunks of --chunk-size
images. A chunk is committed by writing its MDS sub-directory, appending its rows to the Lance table and
then recording it, with its checksums, in state.json (atomically, last). Running the same command again
after a crash drops whatever was not recorded and finishes the rest; on a finished split it only redoes
the end-of-split clean-up (idempotent). Other settings or another tokenizer on an existing dataset are
refused. One job writes a dataset at a time (a lock on DATASET/.lock). The dataset format itself
(manifest, columns, packing, checksums) is the ``shared.token_dataset`` package's.

``--data`` is a folder (local or ``s3://``), Parquet files or WebDataset tars (``dataprep.sources``: the
driver lists them, per shard, and Ray tasks stream the images out of them); a split records its source,
and a rerun over a source that changed is refused.

``--out s3://bucket/prefix`` runs exactly the same job into a local ``--staging`` directory and then
publishes it (``dataprep.publish``: every object first, the manifest last), after checking the bucket,
the credentials and that the prefix is empty or this dataset's before anything is encoded.

Internal, for tests only: ``--_crash-at K:POINT`` (hidden from --help) makes the job exit hard with
status 17 (``os._exit``: no cleanup, like a kill) right after step POINT (mds, lance or state) of the
K-th chunk this run commits, or, with POINT ``complete`` (K = 1), right after the split is recorded
complete and before its manifest and clean-up; the kill-and-resume tests use it to stop a real run.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

try:
    from dataprep import cli
    from dataprep import listing as ls
    from dataprep import publish
    from dataprep import sources
    from dataprep import state as st
    from dataprep import stores
    from dataprep.images import expand_views
    from shared import atomic
    from shared import object_store as store
    from shared import token_dataset as td
    from shared.progress import clock
    from shared.token_dataset import checksums, provenance, writer
    from shared.token_dataset.manifest import now_iso, producer_settings, write_manifest
except ImportError as _e:
    if __name__ != "__main__":
        raise
    # Typically `python` of a Ray head's PATH that is not the project's environment (ray job submit).
    sys.exit(f"error: {sys.executable} cannot import {_e.name}: run dataprep with the Python the project is "
             "installed in (make setup), e.g. .venv/bin/python dataprep/encode.py, or under ray job submit "
             "-- \"$PWD/.venv/bin/python\" dataprep/encode.py")


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
CRASH_EXIT = 17


@dataclass(frozen=True)
class CrashPoint:
    """Internal test hook (see the module doc): exit hard after step ``point`` of this run's ``chunk``-th
    commit, or (``complete``) once the split is recorded complete."""

    chunk: int  # 1-based, counting the chunks this run commits (not the chunk numbers)
    point: str

    POINTS = ("mds", "lance", "state", "complete")

    @classmethod
    def parse(cls, spec: str) -> "CrashPoint":
        k, _, point = spec.partition(":")
        if not k.isdigit() or int(k) < 1 or point not in cls.POINTS or (point == "complete" and int(k) != 1):
            raise argparse.ArgumentTypeError(f"expected K:POINT with K >= 1 and POINT one of {', '.join(cls.POINTS)} "
                                             f"(K = 1 for complete), got {spec!r}")
        return cls(int(k), point)


def _crash(point: str) -> None:
    sys.stderr.write(f"--_crash-at: exiting hard after '{point}'\n")
    sys.stderr.flush()
    os._exit(CRASH_EXIT)


def _split_name(text: str) -> str:
    try:
        return td.check_split_name(text)
    except td.ManifestError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _code_version(text: str) -> str:
    if not text or len(text) > 80 or not text.isprintable() or " " in text:
        raise argparse.ArgumentTypeError(f"expected a commit or the output of git describe, got {text!r}")
    return text


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = cli.Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="image root: ROOT/<split>/<class>/<image> (a folder or s3://BUCKET/PREFIX), "
                                  "Parquet or WebDataset shards (PATH_OR_S3/train-*.parquet, "
                                  "PATH_OR_S3/imagenet1k-train-{0000..1023}.tar), or the base of --file-list paths")
    p.add_argument("--file-list", help="TSV of path<TAB>label (paths relative to --data, or absolute), UTF-8")
    sources.add_arguments(p)
    p.add_argument("--split", default="train", type=_split_name, help="letters, digits, '_', '.', '-'")
    p.add_argument("--tokenizer", required=True, metavar="REF",
                   help="tokenizer checkpoint directory (its weight set is recorded), a Stage-1 run directory "
                        "(its final-raw/ or final/ export, by --tokenizer-weights), or an official .ckpt / "
                        "hf://ORG/REPO[/FILE][@REV] (its --tokenizer-weights set, default raw, converted once and "
                        "cached); where it came from is recorded in the manifest (tokenizer.source)")
    p.add_argument("--tokenizer-weights", choices=provenance.TOKENIZER_WEIGHT_SETS,
                   help="the weight set to encode with: from a Stage-1 run directory, raw (final-raw/, the default: "
                        "what the official AR recipe encodes with) or ema (final/); for a checkpoint directory, the "
                        "set it must hold (default: the one it holds)")
    p.add_argument("--out", required=True,
                   help="dataset directory, or s3://bucket/prefix: encoded into --staging, then published there "
                        "(dataprep.publish: manifest last)")
    p.add_argument("--staging", help="local directory an s3:// --out is encoded into first (resumable; default: "
                                     "TMPDIR/open-magvit2-staging/<hash of --out>)")
    p.add_argument("--s3-endpoint-url", help="endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL_S3, "
                                             "AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--resolution", type=cli.positive_int, default=256)
    p.add_argument("--views", default="center,flip", help="comma list of center, flip, tencrop")
    p.add_argument("--batch-size", type=cli.positive_int, default=32,
                   help="images per tokenizer forward (x views crops)")
    p.add_argument("--chunk-size", type=cli.positive_int, default=4096, help="images per commit")
    p.add_argument("--actors", type=cli.positive_int, default=1, help="tokenizer actors")
    p.add_argument("--gpus-per-actor", type=cli.non_negative_float, default=0.0,
                   help="accelerators per actor: the cluster's GPUs, or its Ascend NPUs when it has no GPU")
    p.add_argument("--cpus-per-actor", type=cli.non_negative_float, default=None,
                   help="default 1 with accelerators, else 0.5 (fractional: leaves CPUs to the decode tasks)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder in every actor (same tokens; compiles once per actor)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 is faster on GPUs but may flip bits whose latent is near 0")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--num-cpus", type=cli.positive_int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--object-store-mb", type=cli.positive_int, help="object store of the local Ray instance")
    p.add_argument("--code-version", type=_code_version,
                   help="the code's commit, recorded in the manifest (default: read from .git beside the code); "
                        "give it under ray job submit, whose upload leaves .git out: "
                        "--code-version \"$(git describe --always --dirty)\"")
    p.add_argument("--_crash-at", dest="crash_at", type=CrashPoint.parse, help=argparse.SUPPRESS)  # tests only
    return p.parse_args(argv)


def _resolve_tokenizer(ref, weights: Optional[str] = None):
    """``stage1_tokenizer.convert_official.resolve_tokenizer``: a model reference -> a tokenizer checkpoint
    directory and its record (``shared.model_ref``). One-line exit."""
    from shared import model_ref
    from shared.checkpoint import CheckpointError
    from stage1_tokenizer.convert_official import resolve_tokenizer

    try:
        return resolve_tokenizer(ref, weights=weights)
    except (CheckpointError, OSError, ValueError) as e:  # ModelRefError is a CheckpointError
        what = "" if model_ref.is_hub_ref(str(ref)) else " is not a checkpoint directory, nor an official file:"
        raise SystemExit(f"error: --tokenizer {ref}{what} {cli.first_line(e)}") from None


def pick_tokenizer(args) -> Tuple[Path, Dict[str, Any]]:
    """--tokenizer and --tokenizer-weights -> the checkpoint directory to encode with (``stage1_tokenizer.exports``:
    a Stage-1 run directory gives its raw set unless told otherwise) and where it came from (the record of
    ``shared.model_ref``, with ``ref`` as typed); a warning when the tokens will not be those of the official
    AR recipe (the EMA set), or when the checkpoint does not say which set it holds.

    --tokenizer is a model reference: a directory (a checkpoint, a Stage-1 run, a converter's OUT), an
    official ``.ckpt`` file or ``hf://ORG/REPO[/FILE][@REV]``; an official file's --tokenizer-weights set
    (default raw, what the official AR recipe encodes with) is converted once and cached, and that directory
    is what the job (its actors too) loads."""
    from shared.model_ref import is_hub_ref
    from stage1_tokenizer.exports import EXPORT_DIRS, FOR_TOKENS, select

    ref, resolved = args.tokenizer, None
    if is_hub_ref(ref) or Path(ref).expanduser().is_file():
        resolved = _resolve_tokenizer(ref, args.tokenizer_weights or FOR_TOKENS)
        ref = resolved.path
    try:
        ckpt, weights = select(ref, args.tokenizer_weights)
    except ValueError as e:
        raise SystemExit(f"error: --tokenizer {e}") from None
    if ckpt != Path(args.tokenizer):
        log.info(f"encoding with {ckpt} (the {weights} weights)")
    if weights is None and ckpt.is_dir():
        log.warning(f"{ckpt} does not record which weight set it holds (raw or EMA): the manifest will not say; "
                    "pass --tokenizer-weights to record it")
    elif weights not in (None, FOR_TOKENS):
        log.warning(f"encoding with the {weights} weights: the official AR recipe encodes with the {FOR_TOKENS} "
                    f"ones (a Stage-1 run's {EXPORT_DIRS[FOR_TOKENS]}/, convert_official --weights "
                    f"{FOR_TOKENS}), and an AR model trained on these tokens decodes with this set only")
    if resolved is None and ckpt.is_dir():  # a directory: its record (sha256 of its weights); else load says why
        resolved = _resolve_tokenizer(ckpt)
    return ckpt, ({**resolved.record(), "ref": str(args.tokenizer)} if resolved is not None else None)


def load_tokenizer(ckpt: Path, weights: Optional[str] = None,
                   source: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load the tokenizer once here, in the driver, before anything is written or Ray starts, so that a
    checkpoint that cannot be used (weights missing or truncated, another kind, a config this code cannot
    build) is one line now rather than a failure in every actor. Returns its provenance, with its weight
    set (the one it records, else ``weights``) and ``source`` (where it came from, ``pick_tokenizer``)."""
    from shared.checkpoint import CheckpointError, load_meta
    from shared.config import ConfigError
    from stage1_tokenizer.tokenizer import Tokenizer

    if not ckpt.is_dir():
        raise SystemExit(f"error: --tokenizer {ckpt} is not a checkpoint directory")
    try:
        meta = load_meta(ckpt)
        if meta.get("kind") != "tokenizer":
            raise SystemExit(f"error: --tokenizer {ckpt} holds a {meta.get('kind')!r} checkpoint, not a tokenizer")
        Tokenizer.from_checkpoint(ckpt)
        identity = provenance.tokenizer_identity(ckpt, meta["config"], weights, source)
    except (CheckpointError, ConfigError, OSError, ValueError, TypeError) as e:
        raise SystemExit(f"error: --tokenizer {ckpt}: {cli.first_line(e)}") from None
    return identity


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
    bits = cfg.z_channels
    # Stage 2 factorises 18-bit tokens as (6, 12); other widths are recorded as one sub-token, so the
    # manifest stays consistent (its sub-token bits must add up to the token bits).
    subtoken_bits = list(DEFAULT_SPLIT) if sum(DEFAULT_SPLIT) == bits else [bits]
    return producer_settings(tokenizer=tok, resolution=args.resolution, views=views, grid=grid, bits_per_token=bits,
                             subtoken_bits=subtoken_bits, classes=classes, precision=args.precision)


def read_listing(args):
    """(data root or None, Listing) of the split, or a one-line refusal. S3 folders and shards:
    ``dataprep.sources`` (a shard listing holds per-shard counts, reused from an earlier run of the split)."""
    if sources.detect(args):
        return sources.read_listing(args, log.info, sources.recorded(_dataset_dir(args), args.split))
    # Relative paths of a file list are taken from --data, else from the list's own folder; either way
    # absolute here, because Ray workers do not share the driver's working directory.
    base = args.data or (Path(args.file_list).parent if args.file_list else None)
    data = Path(base).resolve() if base else None
    try:
        if args.file_list:
            listing = ls.read_file_list(args.file_list)
        elif data is not None:
            listing = ls.scan_folder(data, args.split)
        else:
            raise SystemExit("error: give --data (an image root) or --file-list")
    except ls.ListingError as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:
        raise SystemExit(f"error: cannot read {e.filename or args.file_list or data}: {e.strerror or e}")
    if not listing.items:
        raise SystemExit(f"error: split {args.split!r} lists no images")
    return data, listing


def _dataset_dir(args) -> Path:
    """Where the dataset is written: --out, or the staging directory of an s3:// --out."""
    return staging_dir(args) if store.is_s3(args.out) else Path(args.out)


def recover(root: Path, state: st.State, split: str) -> None:
    """Drop whatever a killed run wrote past the last commit (Lance versions, MDS chunk directories)."""
    store = stores.LanceStore(root)
    if store.rollback(state.lance_version):
        log.info(f"rolled {td.LANCE_DIR} back to committed version {state.lance_version}")
    removed = stores.remove_stray_mds(root, split, list(state.committed(split)))
    if removed:
        log.info(f"removed uncommitted MDS chunk directories: {', '.join(sorted(removed))}")


def commit_chunk(root: Path, state: st.State, split: str, chunk: int, rows: List[Dict[str, Any]],
                 n_images: int, schema, num_views: int, crash_after: Optional[str] = None) -> Dict[str, Any]:
    """MDS chunk, then Lance append, then the record with the chunk's checksums (last: a chunk is
    committed once it is recorded).

    ``crash_after``: the internal test hook, exit hard right after that step.
    """
    rows.sort(key=lambda r: (r["index"], r["view"]))
    good = [r for r in rows if r["view"] >= 0]
    failures = [[r["path"], r["error"]] for r in rows if r["view"] < 0]
    per_class: Dict[str, int] = {}
    for r in good:
        if r["view"] == 0:
            per_class[str(r["label"])] = per_class.get(str(r["label"]), 0) + 1
    mds = writer.write_mds_chunk(root, split, chunk, good, num_views)
    if crash_after == "mds":
        _crash("mds")
    table_rows = [{**r, "split": split} for r in good]
    version = writer.append_lance(root, writer.lance_table(table_rows, schema)) if good else state.lance_version
    if crash_after == "lance":
        _crash("lance")
    first = min(r["index"] for r in rows)  # every image of a chunk gives a row: encoded or failed
    info = {"images": n_images, "encoded": n_images - len(failures), "rows": len(good), "failures": failures,
            "per_class": per_class, "committed_at": round(time.time(), 3),
            "commit": checksums.chunk_record(chunk, first, n_images, table_rows, mds)}
    state.commit_chunk(split, chunk, info, version)
    if crash_after == "state":
        _crash("state")
    return info


def _tsv_field(text: str) -> str:
    """A path or reason as one TSV field: tabs and line breaks (legal in file names) written escaped."""
    return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def finalize(root: Path, state: st.State, split: str, crash_after: Optional[str] = None) -> Dict[str, Any]:
    """Merge the MDS index, write the failures table, compact Lance and record the split complete; then
    the manifest, then drop old Lance versions (``tidy`` redoes the last two after a kill)."""
    committed = sorted(state.committed(split))
    state.split(split)["mds_index_sha256"] = writer.merge_mds(root, split, committed)
    fails = [(split, p, reason) for c in committed for p, reason in state.committed(split)[c]["failures"]]
    atomic.write_text(root / f"failures-{split}.tsv", "split\tpath\treason\n" + "".join(
        f"{s}\t{_tsv_field(p)}\t{_tsv_field(r)}\n" for s, p, r in fails))
    store = stores.LanceStore(root)
    if store.exists():
        state.data["lance_version"] = store.compact()  # recorded before old versions are dropped
    state.split(split)["complete"] = True
    state.save()
    if crash_after == "complete":
        _crash("complete")
    return tidy(root, state)


def tidy(root: Path, state: st.State) -> Dict[str, Any]:
    """The end of a split, idempotent, run on every start of a finished one: Lance back at the recorded
    version and compacted, the manifest, old versions and unreferenced files dropped."""
    store = stores.LanceStore(root)
    if store.exists():
        if store.rollback(state.lance_version):
            log.info(f"rolled {td.LANCE_DIR} back to committed version {state.lance_version}")
        version = store.compact()
        if version != state.lance_version:
            state.data["lance_version"] = version
            state.save()
    manifest = write_manifest(root, st.manifest_of(state))  # before the clean-up: it names the version readers open
    if store.exists():
        store.cleanup()
    return manifest


class OutDir:
    """--out for the job's duration: created if missing (removed again, if still empty, when the job
    fails), locked against a second writer; every problem one line."""

    def __init__(self, root: Path, option: str = "--out"):
        self.root, self.option = root, option  # the option that named it (--staging for an s3:// --out)
        self.made: List[Path] = []
        self.lock: Optional[st.Lock] = None

    def __enter__(self) -> "OutDir":
        root = self.root
        try:  # a file there, or a place this user cannot write (whether it holds a dataset comes later)
            atomic.check_output_dir(root, owned=lambda p: True, replaced=False)
        except atomic.OutputError as e:
            raise SystemExit(f"error: {self.option} {e}") from None
        self.made = [p for p in (root, *root.parents) if not p.exists()]
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.lock = st.Lock(root).__enter__()
        except st.LockedError as e:
            self._undo()
            raise SystemExit(f"error: {e}") from None
        except OSError as e:  # what the check above cannot see (root's access checks, read-only mounts)
            self._undo()
            raise SystemExit(f"error: {self.option} cannot write {root}: {e.strerror or e}") from None
        return self

    def __exit__(self, kind, *exc):
        if self.lock is not None:
            self.lock.__exit__()
        if kind is not None:
            self._undo()

    def _undo(self) -> None:
        for p in self.made:  # deepest first; only directories this job made and left empty
            try:
                p.rmdir()
            except OSError:
                break


def run(args) -> int:
    t0 = time.time()
    try:
        views = expand_views(args.views)
    except ValueError as e:
        raise SystemExit(f"error: --views: {e}")
    try:  # before the tokenizer is picked: its warnings must not precede an argument error
        store.check_endpoint_url(args.s3_endpoint_url)
    except store.StoreError as e:
        raise SystemExit(f"error: --s3-endpoint-url: {e}") from None
    ckpt, source = pick_tokenizer(args)
    tok = load_tokenizer(ckpt, args.tokenizer_weights, source)
    data, listing = read_listing(args)
    settings = settings_for(args, tok, listing.classes, views)
    run_settings = {"num_images": listing.num_images, "listing_sha256": listing.sha256(),
                    "chunk_size": args.chunk_size, "batch_size": args.batch_size,
                    "source": sources.kind(args, listing)}
    source = sources.record(args, data, listing)
    target = args.out if store.is_s3(args.out) else None
    if target:
        root = staging_dir(args)
        try:
            prior = st.State.load(root)  # None until a first run made the staging directory
        except st.ProvenanceError as e:
            raise SystemExit(f"error: --staging {e}") from None
        try:
            store.configure(args.s3_endpoint_url)
            publish.check_target(target, prior.data.get("created") if prior else None)
        except (publish.PublishError, store.StoreError) as e:
            raise SystemExit(f"error: --out {e}") from None
        log.info(f"encoding into the staging directory {root}, published to {store.redact(target)} at the end")
    else:
        if args.staging or (args.s3_endpoint_url and not store.is_s3(args.data or "")):
            raise SystemExit("error: --staging goes with an s3:// --out, --s3-endpoint-url with an s3:// --out or "
                             "--data")
        root = Path(args.out)
    with OutDir(root, "--staging" if target else "--out"):
        try:
            state = st.State.load(root)
        except st.ProvenanceError as e:
            raise SystemExit(f"error: {e}")
        if state is None:
            if any(p.name != st.LOCK for p in root.iterdir()):
                raise SystemExit(f"error: {root} is not empty and holds no token dataset")
            state = st.State.new(root, settings)
            state.data["created"] = now_iso()
        else:
            for p in st.remove_leftovers(root):  # half-written files of a job killed while writing them
                log.info(f"removed {p.relative_to(root)}, left by a killed job")
        recorded = state.settings.get("tokenizer")
        if isinstance(recorded, dict) and recorded.get("checkpoint_sha256") == tok["checkpoint_sha256"] and \
                recorded.get("weights", tok.get("weights")) == tok.get("weights"):
            # the same weights: a dataset keeps the record it was begun with (one from before the weight set or
            # the source was recorded, or the source of another reference to the same checkpoint)
            settings["tokenizer"] = recorded
        try:
            state.check_settings(settings)
            sources.check_unchanged((state.split(args.split) or {}).get("source"), source, args.split)
            split_rec = state.start_split(args.split, run_settings)
            if not split_rec["complete"]:
                split_rec.setdefault("source", source)  # the manifest's sources.<split>
        except st.ProvenanceError as e:
            raise SystemExit(f"error: {e}")
        if split_rec["complete"]:
            c = tidy(root, state)["counts"][args.split]
            print(f"split {args.split!r} of {root} is already complete ({c['encoded_images']} encoded, "
                  f"{c['failed_images']} failed): nothing to {'encode' if target else 'do'}")
        else:
            encode_split(args, root, state, listing, settings, views, data, ckpt, t0)
    return publish_to(target, root)


def encode_split(args, root: Path, state: st.State, listing, settings, views, data, ckpt: Path, t0: float) -> None:
    """Encode the chunks of the split not yet committed, then record it complete (under the writer lock)."""
    chunks = ls.chunk_ranges(listing.num_images, args.chunk_size)
    done = state.committed(args.split)
    todo = [c for c in range(len(chunks)) if c not in done]
    skipped = sum(chunks[c][1] - chunks[c][0] for c in done)
    ray_mode = start_ray(args) if todo else None  # refusals come before anything is written
    try:
        state.data["tokenizer_path"] = str(ckpt.resolve())
        state.data["code_version"] = provenance.code_version(args.code_version)
        if args.code_version is None and provenance.git_commit() is None:
            log.warning("the code's commit is unknown (no .git beside it, as under ray job submit): pass "
                        "--code-version \"$(git describe --always --dirty)\" to record it")
        state.save()
        recover(root, state, args.split)
        log.info(f"split {args.split!r}: {listing.num_images} images in {len(chunks)} chunks; "
                 f"{len(done)} already committed ({skipped} images skipped), {len(todo)} to do")
        encoded = failed = 0
        if todo:
            with atomic.disk_full_as_error(root):  # at a chunk commit: the chunks committed before it stay
                encoded, failed = encode_chunks(args, root, state, listing, chunks, todo, settings, views, data)
    finally:
        if ray_mode == "local":
            import ray

            ray.shutdown()
    crash = args.crash_at.point if args.crash_at and args.crash_at.point == "complete" else None
    with atomic.disk_full_as_error(root):  # the split stays unfinished: a rerun finalizes it
        manifest = finalize(root, state, args.split, crash)
    c = manifest["counts"][args.split]
    print(f"done in {time.time() - t0:.1f}s: split {args.split!r} encoded {encoded}, failed {failed}, "
          f"skipped {skipped} (already committed); dataset total {c['encoded_images']} encoded, "
          f"{c['failed_images']} failed, {c['rows']} rows; listing ignored {listing.ignored} non-image files")


def publish_to(target: Optional[str], root: Path) -> int:
    """Publish the staging directory to an s3:// --out; after the writer lock is released (publishing
    refuses a dataset a job is writing)."""
    if target:
        try:
            publish.publish(root, target, log=log.info)
        except (publish.PublishError, store.StoreError) as e:
            raise SystemExit(f"error: the split is encoded in {root} but publishing it failed: {e}; run the same "
                             "command again to retry") from None
    return 0


def staging_dir(args) -> Path:
    if args.staging:
        return Path(args.staging)
    import hashlib
    import tempfile

    key = hashlib.sha1(args.out.rstrip("/").encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "open-magvit2-staging" / key


def start_ray(args) -> str:
    """Start or join Ray and check the actor pool fits the cluster; one line (and Ray stopped) if not."""
    import ray

    from dataprep import pipeline

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:  # a local instance: its CPUs are known before starting it
        try:
            pipeline.check_resources({"CPU": float(args.num_cpus or os.cpu_count() or 1)}, args.actors,
                                     _cpus_per_actor(args), 0.0)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    try:
        mode = pipeline.init_ray(args.address, args.num_cpus, args.object_store_mb, log)
    except (ConnectionError, RuntimeError, ValueError, OSError) as e:
        raise SystemExit(f"error: cannot {'join Ray at ' + address if address else 'start Ray'}: "
                         f"{cli.first_line(e)}") from None
    try:
        resources = ray.cluster_resources()
        accel = pipeline.accelerator_resource(resources)
        if accel and args.gpus_per_actor == 0:
            log.warning(f"the cluster has {resources[accel]:g} {accel}s but --gpus-per-actor is 0: "
                        "the tokenizer runs on CPUs")
        pipeline.check_resources(resources, args.actors, _cpus_per_actor(args), args.gpus_per_actor)
    except ValueError as e:
        if mode == "local":
            ray.shutdown()
        raise SystemExit(f"error: {e}") from None
    return mode


def _cpus_per_actor(args) -> float:
    return args.cpus_per_actor if args.cpus_per_actor is not None else (1.0 if args.gpus_per_actor > 0 else 0.5)


def encode_chunks(args, root, state, listing, chunks, todo, settings, views, data):
    import ray

    from dataprep import pipeline

    grid = settings["grid"]
    bits = settings["bits_per_token"]
    schema = writer.lance_schema(td.Packing(bits, grid[0] * grid[1]), settings)
    rows = sources.work_rows(listing, args.split, chunks, todo, args.batch_size)
    ds = pipeline.build(rows, root=str(data) if data else None, checkpoint=str(Path(state.data["tokenizer_path"])),
                        resolution=args.resolution, views=views, bits=bits, actors=args.actors,
                        accelerators=args.gpus_per_actor, cpus_per_actor=_cpus_per_actor(args),
                        precision=args.precision, resource=pipeline.accelerator_resource(ray.cluster_resources()),
                        compile=args.compile, read=sources.read_stage(listing))
    pending: Dict[int, Dict[str, Any]] = {c: {"rows": [], "seen": set()} for c in todo}
    n_done = encoded = failed = 0
    this_run = sum(chunks[c][1] - chunks[c][0] for c in todo)  # images
    t0 = time.time()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for r in batch.to_pylist():
                p = pending[r["chunk"]]
                p["rows"].append(r)
                p["seen"].add(r["index"])
            for c in [c for c, p in pending.items() if len(p["seen"]) == chunks[c][1] - chunks[c][0]]:
                p = pending.pop(c)
                crash = args.crash_at.point if args.crash_at and args.crash_at.chunk == n_done + 1 and \
                    args.crash_at.point != "complete" else None
                info = commit_chunk(root, state, args.split, c, p["rows"], chunks[c][1] - chunks[c][0], schema,
                                    len(views), crash)
                n_done += 1
                encoded += info["encoded"]
                failed += len(info["failures"])
                elapsed = max(time.time() - t0, 1e-9)
                rate = (encoded + failed) / elapsed
                log.info(f"chunk {c + 1}/{len(chunks)} committed: {info['encoded']} encoded, "
                         f"{len(info['failures'])} failed ({n_done}/{len(todo)} this run, {rate:.1f} images/s, "
                         f"elapsed {clock(elapsed)}, ETA {clock((this_run - encoded - failed) / max(rate, 1e-9))})")
    except ray.exceptions.RayError as e:
        # Committed chunks stay committed: running the same command again resumes after them.
        raise SystemExit(f"error: the Ray pipeline failed after {n_done} committed chunks "
                         f"({cli.first_line(e, with_type=True)}); run the same command to resume")
    if pending:
        raise SystemExit(f"error: the pipeline ended with {len(pending)} chunks incomplete; run again to resume")
    return encoded, failed


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except atomic.DiskFullError as e:  # what was committed stays committed: a rerun resumes after it
        sys.stderr.write(f"error: {e}\n")
        return 1
    except KeyboardInterrupt:  # Ctrl-C: what was committed stays committed (the lock and Ray are released)
        sys.stderr.write("error: interrupted; the chunks committed so far are kept: run the same command to "
                         "resume\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
