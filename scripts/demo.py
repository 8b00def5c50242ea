"""End-to-end demo on a laptop CPU: Fashion-MNIST -> tokenizer -> Ray encode -> AR model -> samples.

    make demo                       # installs, then runs this with the defaults (time measured on 2 cores: docs/demo.md)
    python scripts/demo.py --out demo-out [--quick]

Every step is the project's real command line, run as a subprocess exactly as a user would type it, and
everything lands under one folder:

    OUT/data/{train,val}/<class>/*.png     Fashion-MNIST as an ImageNet-style folder (32x32 RGB)
    OUT/tokenizer/                          tokenizer run (checkpoints, metrics.jsonl, image grids, final/ = EMA, final-raw/ = raw)
    OUT/tokenizer-eval.json                 PSNR, SSIM, codebook usage of the EMA tokenizer on val
    OUT/tokens/                             token dataset: manifest.json, tokens.lance, mds/train
    OUT/inspect-grid.png                    a few rows of the token dataset decoded back to pixels
    OUT/ar/                                 AR run (checkpoints, metrics.jsonl, sample grids)
    OUT/samples/                            class-conditional grid (one row per class) + samples.npz
    OUT/summary.md                          the table printed at the end
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def ensure_fashion_mnist(root: Path) -> None:
    if (root / "train-images-idx3-ubyte.gz").is_file():
        return
    if root != FMNIST:
        raise SystemExit(f"error: no Fashion-MNIST IDX files in {root}")
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("== installing Debian's dataset-fashion-mnist", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        if subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"]).returncode == 0:
            return
    raise SystemExit("error: Fashion-MNIST is missing. Install Debian/Ubuntu's 'dataset-fashion-mnist' package "
                     "(sudo apt-get install dataset-fashion-mnist), or put the four IDX .gz files in a folder "
                     "and run: python -m dataprep.fashion_mnist --root FOLDER --out OUT/data")


class Steps:
    def __init__(self, log_dir: Path):
        self.times: dict[str, float] = {}
        self.log_dir = log_dir

    def run(self, name: str, argv: list[str]) -> None:
        print(f"\n== {name}\n$ {' '.join(argv)}", flush=True)
        t = time.time()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        r = subprocess.run(argv, cwd=ROOT, env=env)
        self.times[name] = time.time() - t
        if r.returncode != 0:
            raise SystemExit(f"error: step '{name}' failed with exit code {r.returncode}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "demo-out")
    ap.add_argument("--per-class", type=int, default=600, help="training images per class")
    ap.add_argument("--val-per-class", type=int, default=20)
    ap.add_argument("--tokenizer-steps", type=int, default=800)
    ap.add_argument("--ar-steps", type=int, default=1500)
    ap.add_argument("--samples-per-class", type=int, default=8)
    ap.add_argument("--fmnist-root", type=Path, default=FMNIST, help="folder with the Fashion-MNIST IDX .gz files")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run (a minute or two; pictures mean nothing)")
    a = ap.parse_args(argv)
    if a.quick:
        a.per_class, a.val_per_class, a.tokenizer_steps, a.ar_steps, a.samples_per_class = 20, 4, 20, 20, 2
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ensure_fashion_mnist(a.fmnist_root)
    py = sys.executable
    # EMA weights for evaluating the tokenizer, raw weights for the tokens (what the official AR recipe encodes with)
    tok_run, tok, tok_raw = out / "tokenizer", out / "tokenizer" / "final", out / "tokenizer" / "final-raw"
    steps = Steps(out)
    t0 = time.time()

    steps.run("1/6 Fashion-MNIST -> ImageNet-style folder", [
        py, "-m", "dataprep.fashion_mnist", "--root", str(a.fmnist_root), "--out", str(out / "data"), "--per-class", str(a.per_class),
        "--val-per-class", str(a.val_per_class), "--size", "32"])
    steps.run("2/6 train the tokenizer (tokenizer-demo)", [
        py, "-m", "stage1_tokenizer.train", "--config", "tokenizer-demo", f"data.root={out / 'data' / 'train'}",
        f"data.val_root={out / 'data' / 'val'}", f"out_dir={tok_run}", f"max_steps={a.tokenizer_steps}", "threads=2"])
    steps.run("3/6 evaluate the tokenizer on val", [
        py, "-m", "stage1_tokenizer.evaluate", "--ckpt", str(tok), "--data", str(out / "data" / "val"),
        "--resolution", "32", "--workers", "0", "--out", str(out / "tokenizer-eval.json")])
    steps.run("4/6 encode the dataset with the Ray job (embedded local Ray)", [
        py, "dataprep/encode.py", "--data", str(out / "data"), "--split", "train", "--tokenizer", str(tok_run),
        "--out", str(out / "tokens"), "--resolution", "32", "--views", "center,flip", "--batch-size", "64",
        "--chunk-size", "2048", "--num-cpus", "2"])
    steps.run("4b inspect the token dataset", [py, "-m", "dataprep.inspect_dataset", str(out / "tokens"),
                                               "--grid", str(out / "inspect-grid.png")])
    steps.run("5/6 train the AR model from the MDS shards (ar-demo)", [
        py, "-m", "stage2_ar.train", "--config", "ar-demo", f"data.path={out / 'tokens'}", f"out_dir={out / 'ar'}",
        f"schedule.max_steps={a.ar_steps}", f"tokenizer={tok_raw}"])
    ar_ckpts = sorted((out / "ar").glob("step-*"))
    steps.run("6/6 sample a class-conditional grid (one row per class)", [
        py, "-m", "stage2_ar.sample", "--ckpt", str(ar_ckpts[-1]), "--tokenizer", str(tok_raw),
        "--classes", ",".join(str(c) for c in range(10)), "--per-class", str(a.samples_per_class),
        "--out", str(out / "samples"), "--npz", "--seed", "0"])

    summary = summarize(out, steps.times, time.time() - t0)
    (out / "summary.md").write_text(summary)
    print("\n" + summary)
    return 0


def _last_metric(path: Path, key: str):
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []
    vals = [(r["step"], r[key]) for r in rows if key in r]
    return vals[-1] if vals else (None, None)


def summarize(out: Path, times: dict, total: float) -> str:
    ev = json.loads((out / "tokenizer-eval.json").read_text())
    inspect = subprocess.run([sys.executable, "-m", "dataprep.inspect_dataset", str(out / "tokens"), "--json"],
                             cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    info = json.loads(inspect.stdout) if inspect.returncode == 0 else {}
    manifest = json.loads((out / "tokens" / "manifest.json").read_text())
    step, loss = _last_metric(out / "ar" / "metrics.jsonl", "loss")
    encode_s = times.get("4/6 encode the dataset with the Ray job (embedded local Ray)", float("nan"))
    n_rows = sum(c.get("encoded_images", 0) for c in info.get("splits", {}).values()) if info else 0
    rows = [
        ("tokenizer PSNR (val, dB)", f"{ev.get('psnr', float('nan')):.2f}"),
        ("tokenizer SSIM (val)", f"{ev.get('ssim', float('nan')):.3f}"),
        ("tokenizer codebook usage (val)", f"{ev.get('codebook_usage', float('nan')):.4%}"),
        ("token dataset (rows = images x views)", ", ".join(
            f"{split}: {c.get('rows')} rows of {c.get('encoded_images')} images" for split, c in manifest.get("counts", {}).items())),
    ]
    for store, b in (info.get("bytes_per_token") or {}).items():
        rows.append((f"bytes per token ({store})", f"{b['bytes_per_token']:.3f}"))
    if n_rows:
        rows.append(("encode job throughput (images/s, incl. Ray start-up)", f"{n_rows / encode_s:.1f}"))
    rows += [
        ("AR final training loss (ln64+ln4096 = 12.48 at init)", f"{loss:.3f} at step {step}" if loss is not None else "n/a"),
        ("sample grid", str(next((out / "samples").glob("*.png"), "n/a"))),
        ("tokenizer reconstructions", str(out / "tokenizer" / "images")),
        ("total time", f"{total / 60:.1f} min"),
    ]
    for name, s in times.items():
        rows.append((f"  {name}", f"{s:.0f} s"))
    w = max(len(r[0]) for r in rows)
    return "| what | value |\n| --- | --- |\n" + "\n".join(f"| {k.ljust(w)} | {v} |" for k, v in rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
