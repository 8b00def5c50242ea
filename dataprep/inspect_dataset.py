"""Inspect a token dataset: counts, per-class counts, codebook usage, bytes per token and provenance.

    python -m dataprep.inspect_dataset DATASET [--split train] [--json]
    python -m dataprep.inspect_dataset DATASET --grid rows.png [--rows 8] [--tokenizer CKPT]
    python -m dataprep.inspect_dataset DATASET --verify     # exit status 1 when anything is damaged

--grid PATH also decodes a few rows back to pixels with the tokenizer (the one the manifest records, or
--tokenizer) and writes them as one PNG at PATH, a visual check; nothing is written without it. --verify
checks every row of both stores (Lance and MDS) against the recorded checksums and each other
(``dataprep.verify``) and reports the rows of each split in each store.

The figures are those of the committed rows (the manifest's Lance version), whatever a writer is doing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from dataprep import cli


def _parser() -> argparse.ArgumentParser:
    """The command line (light: built and parsed before the heavy imports below)."""
    p = cli.Parser(prog="python -m dataprep.inspect_dataset", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="a token dataset directory, or its s3:// URI")
    p.add_argument("--split", help="restrict the token statistics (and the grid's rows) to one split")
    p.add_argument("--grid", metavar="PATH", help="decode --rows rows with the tokenizer and write them as one PNG "
                                                  "at PATH (nothing is written without it)")
    p.add_argument("--rows", type=int, default=8, help="rows in the --grid PNG (default: 8)")
    p.add_argument("--tokenizer", metavar="CKPT",
                   help="tokenizer checkpoint for --grid (default: the one the manifest records)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON only")
    p.add_argument("--verify", action="store_true",
                   help="read every row of both stores, check checksums and agreement, report the rows of each "
                        "split per store; exit 1 if damaged (an s3:// dataset is downloaded into a temporary "
                        "directory first)")
    p.add_argument("--s3-endpoint-url", help="endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL_S3, "
                                             "AWS_ENDPOINT_URL, else AWS)")
    return p


if __name__ == "__main__":  # --help and argument errors answer before the heavy imports below
    _parser().parse_args()

import numpy as np  # noqa: E402

from shared import object_store  # noqa: E402
from shared import token_dataset as td  # noqa: E402
from shared.token_dataset import TokenDataset  # noqa: E402
from shared.token_dataset.provenance import tokenizer_mismatch  # noqa: E402


def summarize(ds: TokenDataset, split: Optional[str] = None) -> Dict[str, Any]:
    """Everything printed, as a dict (also for tests)."""
    rows = ds.read_lance(split=split, columns=("label", "view", "tokens"))
    tokens = rows["tokens"].reshape(-1)
    sub = ds.subtokens(tokens)
    m = ds.manifest
    return {
        "splits": {k: {kk: getattr(v, kk) for kk in ("images", "encoded_images", "failed_images", "rows", "complete")}
                   for k, v in m.counts.items()},
        "per_class": {k: v.to_dict()["per_class"] for k, v in m.counts.items()},
        "failures": m.failures,
        "lance_rows": len(rows["id"]),
        "codebook_usage": {
            "distinct_tokens": int(np.unique(tokens).size),
            "fraction_of_codebook": float(np.unique(tokens).size / 2 ** ds.bits),
            "distinct_subtokens": [int(np.unique(s).size) for s in sub],
            "entropy_bits": _entropy(tokens),
        },
        "bytes_per_token": ds.bytes_per_token(),
        "provenance": {"tokenizer": m.tokenizer["preset"], "checkpoint_sha256": m.tokenizer["checkpoint_sha256"],
                       "tokenizer_weights": m.tokenizer.get("weights"), "tokenizer_source": m.tokenizer.get("source"),
                       "resolution": m.resolution, "views": list(m.views), "grid": list(m.grid),
                       "bits_per_token": ds.bits, "bit_order": td.BIT_ORDER, "subtoken_bits": list(m.subtoken_bits),
                       "packing": m.packing.to_dict(), "created": m.created, "code_version": m.code_version,
                       "sources": {k: f"{v['format']} {v['uri']}" + (f" ({len(v['shards'])} shards)" if "shards" in v
                                                                     else "") for k, v in (m.sources or {}).items()},
                       "lance_schema_matches_manifest": ds.provenance()["tokenizer"] == m.tokenizer},
    }


def _entropy(tokens: np.ndarray) -> float:
    """Empirical entropy of the token distribution in bits (18 = uniform over the whole codebook)."""
    if tokens.size == 0:
        return 0.0
    _, c = np.unique(tokens, return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


class GridError(ValueError):
    """The tokenizer for the decoded grid cannot be used."""


def decode_grid(ds: TokenDataset, ckpt: Path, out: Path, n: int, split: Optional[str]) -> Optional[Path]:
    """The PNG of ``n`` rows decoded (None when there are no rows); GridError for an unusable tokenizer."""
    import torch

    from shared.checkpoint import CheckpointError
    from shared.runlog import image_grid, save_png
    from stage1_tokenizer.tokenizer import Tokenizer

    try:
        if tokenizer_mismatch(td.tokens_record(ds.manifest), ckpt):
            raise GridError(f"{ckpt} is not the tokenizer this dataset was made with (sha256 differs)")
        tok = Tokenizer.from_checkpoint(ckpt)
    except (CheckpointError, OSError) as e:
        raise GridError(f"{ckpt}: {e}") from None
    rows = ds.read_lance(split=split, columns=("tokens",))
    if not rows["id"]:
        return None
    pick = np.linspace(0, len(rows["id"]) - 1, num=min(n, len(rows["id"]))).round().astype(int)
    images = tok.decode(torch.from_numpy(rows["tokens"][pick]))
    save_png(image_grid(images.clamp(-1, 1)), out)
    return out


def run_verify(root: Path, shown: Optional[str] = None) -> int:
    """``shown``: the name messages give the dataset (its URI when ``root`` is a downloaded copy)."""
    from dataprep import verify

    try:
        rep = verify.verify(root)
    except td.ManifestError as e:
        raise SystemExit(f"error: {e}")
    for note in rep.notes:
        print(f"note: {note}")
    for problem in rep.problems:
        print(f"damaged: {problem}")
    root = shown or root
    if not rep.ok:
        sys.stderr.write(f"error: {root}: {len(rep.problems)} problems found (listed above)\n")
        return 1
    print(f"verified {root}: {verified_rows(rep)}; all match their checksums and each other")
    return 0


def verified_rows(rep: Any) -> str:
    """The rows a clean ``verify`` report read, per split and per store: every row of a split is stored once
    in Lance and once in MDS, so a split of 400 rows is 400 rows, read twice."""
    total = sum(rep.rows_checked.values())
    splits = [f"split {split}: {max(stores.values(), default=0)} rows ("
              + ", ".join(f"{store} {n}" for store, n in stores.items()) + ")"
              for split, stores in rep.store_rows.items()]
    return f"{total} rows of {len(rep.rows_checked)} splits read, counting both stores; " + "; ".join(splits)


def verify_remote(uri: str) -> int:
    """--verify of a dataset on object storage: its objects downloaded into a temporary directory (the
    check reads every byte anyway), then verified there."""
    import tempfile

    try:
        td.read_manifest(uri)
        with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
            for rel, _ in list(object_store.list_objects(uri)):
                dest = Path(tmp, rel)
                dest.parent.mkdir(parents=True, exist_ok=True)
                object_store.download_file(object_store.join(uri, rel), str(dest))
            return run_verify(Path(tmp), shown=uri)
    except (td.ManifestError, object_store.StoreError) as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: Optional[List[str]] = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.rows < 0:
        p.error(f"argument --rows: expected a number >= 0, got {args.rows}")
    try:
        object_store.configure(args.s3_endpoint_url)
    except object_store.StoreError as e:
        raise SystemExit(f"error: --s3-endpoint-url: {e}")
    if args.verify and object_store.is_s3(args.dataset):
        return verify_remote(args.dataset)
    if args.verify:
        return run_verify(Path(args.dataset))
    try:
        ds = TokenDataset(args.dataset)
    except td.ManifestError as e:
        raise SystemExit(f"error: {e}")
    if args.split is not None and args.split not in ds.splits:
        raise SystemExit(f"error: {args.dataset} has no split {args.split!r} (it has {', '.join(ds.splits)})")
    try:
        info = summarize(ds, args.split)
    except Exception as e:  # a damaged or missing store: say so in one line; --verify tells what is damaged
        raise SystemExit(f"error: cannot read {ds.root}'s rows ({cli.first_line(e, with_type=True)}); "
                         "run with --verify")
    ckpt = args.tokenizer or ds.manifest.tokenizer_path
    info["decoded_grid"], skipped = None, "no tokenizer checkpoint found; pass --tokenizer"
    if not args.grid:
        skipped = "not asked; --grid PATH writes one"
    elif args.rows == 0:
        skipped = "--rows 0"
    elif ckpt and (args.tokenizer or Path(ckpt, "model.safetensors").is_file()):
        out = Path(args.grid)
        try:
            grid = decode_grid(ds, Path(ckpt), out, args.rows, args.split)
        except GridError as e:
            if args.tokenizer:
                raise SystemExit(f"error: --tokenizer {e}")
            grid, skipped = None, f"the recorded tokenizer is unusable ({e}); pass --tokenizer"
        info["decoded_grid"] = str(grid) if grid else None
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"dataset {ds.root}")
    for name, c in info["splits"].items():
        print(f"  split {name}: {c['encoded_images']} encoded / {c['failed_images']} failed of {c['images']} images, "
              f"{c['rows']} rows, complete={c['complete']}")
        classes = ds.manifest.classes
        per = {classes[int(k)]: v for k, v in info["per_class"][name].items()}
        print(f"    per class: {json.dumps(per)}")
    u = info["codebook_usage"]
    print(f"  codebook usage: {u['distinct_tokens']} distinct tokens ({100 * u['fraction_of_codebook']:.3f}% of "
          f"2^{ds.bits}), sub-tokens {u['distinct_subtokens']}, entropy {u['entropy_bits']:.2f} bits")
    for store, b in info["bytes_per_token"].items():
        print(f"  {store}: {b['bytes']} bytes for {b['tokens']} tokens = {b['bytes_per_token']:.3f} bytes/token")
    print("  provenance: " + json.dumps(info["provenance"]))
    print(f"  decoded grid: {info['decoded_grid'] or f'skipped ({skipped})'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
