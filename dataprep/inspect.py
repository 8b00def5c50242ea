"""Inspect a token dataset: counts, per-class counts, codebook usage, bytes per token, provenance, and a
PNG grid of a few rows decoded back to pixels with the tokenizer (a visual check).

    python -m dataprep.inspect DATASET [--split train] [--grid out.png] [--rows 8] [--tokenizer CKPT]
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
import json
from typing import Any, Dict, List, Optional

import numpy as np

from dataprep.reader import TokenDataset
from dataprep.state import sha256_file


def summarize(ds: TokenDataset, split: Optional[str] = None) -> Dict[str, Any]:
    """Everything printed, as a dict (also for tests)."""
    rows = ds.read_lance(split=split, columns=("label", "view", "tokens"))
    tokens = rows["tokens"].reshape(-1)
    sub = ds.subtokens(tokens)
    counts = ds.manifest["counts"]
    return {
        "splits": {k: {kk: v[kk] for kk in ("images", "encoded_images", "failed_images", "rows", "complete")}
                   for k, v in counts.items()},
        "per_class": {k: v["per_class"] for k, v in counts.items()},
        "failures": ds.manifest["failures"],
        "lance_rows": len(rows["id"]),
        "codebook_usage": {
            "distinct_tokens": int(np.unique(tokens).size),
            "fraction_of_codebook": float(np.unique(tokens).size / 2 ** ds.bits),
            "distinct_subtokens": [int(np.unique(s).size) for s in sub],
            "entropy_bits": _entropy(tokens),
        },
        "bytes_per_token": ds.bytes_per_token(),
        "provenance": {"tokenizer": ds.manifest["tokenizer"]["preset"],
                       "checkpoint_sha256": ds.manifest["tokenizer"]["checkpoint_sha256"],
                       "resolution": ds.manifest["resolution"], "views": ds.manifest["views"],
                       "grid": ds.manifest["grid"], "bits_per_token": ds.bits,
                       "bit_order": ds.manifest["bit_order"], "subtoken_bits": ds.manifest["subtoken_bits"],
                       "created": ds.manifest["created"], "code_version": ds.manifest["code_version"],
                       "lance_schema_matches_manifest": ds.provenance()["tokenizer"] == ds.manifest["tokenizer"]},
    }


def _entropy(tokens: np.ndarray) -> float:
    """Empirical entropy of the token distribution in bits (18 = uniform over the whole codebook)."""
    if tokens.size == 0:
        return 0.0
    _, c = np.unique(tokens, return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def decode_grid(ds: TokenDataset, ckpt: Path, out: Path, n: int, split: Optional[str]) -> Path:
    import torch

    from shared.runlog import image_grid, save_png
    from stage1_tokenizer.tokenizer import Tokenizer

    want = ds.manifest["tokenizer"]["checkpoint_sha256"]
    if sha256_file(Path(ckpt) / "model.safetensors") != want:
        raise SystemExit(f"error: {ckpt} is not the tokenizer this dataset was made with (sha256 differs)")
    rows = ds.read_lance(split=split, columns=("tokens",))
    pick = np.linspace(0, len(rows["id"]) - 1, num=min(n, len(rows["id"]))).round().astype(int)
    tok = Tokenizer.from_checkpoint(ckpt)
    images = tok.decode(torch.from_numpy(rows["tokens"][pick]))
    save_png(image_grid(images.clamp(-1, 1)), out)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset")
    p.add_argument("--split", help="restrict the token statistics to one split")
    p.add_argument("--tokenizer", help="checkpoint for the decoded grid (default: the one recorded)")
    p.add_argument("--grid", help="PNG path of the decoded grid (default: DATASET/inspect-grid.png)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print the summary as JSON only")
    args = p.parse_args(argv)
    try:
        ds = TokenDataset(args.dataset)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    info = summarize(ds, args.split)
    ckpt = args.tokenizer or ds.manifest.get("tokenizer_path")
    if ckpt and Path(ckpt, "model.safetensors").is_file() and args.rows > 0:
        out = Path(args.grid) if args.grid else ds.root / "inspect-grid.png"
        info["decoded_grid"] = str(decode_grid(ds, Path(ckpt), out, args.rows, args.split))
    else:
        info["decoded_grid"] = None
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"dataset {ds.root}")
    for name, c in info["splits"].items():
        print(f"  split {name}: {c['encoded_images']} encoded / {c['failed_images']} failed of {c['images']} images, "
              f"{c['rows']} rows, complete={c['complete']}")
        classes = ds.manifest["classes"]
        per = {classes[int(k)]: v for k, v in info["per_class"][name].items()}
        print(f"    per class: {json.dumps(per)}")
    u = info["codebook_usage"]
    print(f"  codebook usage: {u['distinct_tokens']} distinct tokens ({100 * u['fraction_of_codebook']:.3f}% of "
          f"2^{ds.bits}), sub-tokens {u['distinct_subtokens']}, entropy {u['entropy_bits']:.2f} bits")
    for store, b in info["bytes_per_token"].items():
        print(f"  {store}: {b['bytes']} bytes for {b['tokens']} tokens = {b['bytes_per_token']:.3f} bytes/token")
    print("  provenance: " + json.dumps(info["provenance"]))
    print(f"  decoded grid: {info['decoded_grid'] or 'skipped (no tokenizer checkpoint found; pass --tokenizer)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
