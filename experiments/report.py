"""Tables (markdown + JSON) and figures (PNG) from the results of the runs.

Every figure is "mean ± s" over the seeds that ran, s being half the range (for two seeds: half their
difference); the per-seed values are in results.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from experiments.baseline import compress
from experiments.presets import Suite
from shared import atomic
from shared.images import to_uint8_nhwc

Results = Dict[str, Dict[str, Dict[str, Any]]]  # experiment -> seed (as text) -> result


def spread(values: Sequence[float]) -> Tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float((v.max() - v.min()) / 2)


def fmt(values: Sequence[float], digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
    m, s = spread([x * scale for x in values])
    text = f"{m:.{digits}f}" if len(values) < 2 else f"{m:.{digits}f} ± {s:.{digits}f}"
    return text + unit


def _seeds(res: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [res[k] for k in sorted(res, key=int)]


def tokenizer_table(suite: Suite, results: Results) -> str:
    head = ("| run | bits / token | bits / image | parameters | held-out PSNR (dB) | held-out SSIM "
            "| codes used / reachable (held-out) | perplexity (held-out) | codes used / reachable (train crops) "
            "| seeds | CPU minutes per run |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    rows = []
    base = results.get("tok-bicubic", {}).get("-")
    if base:
        for k, b in sorted(base["budgets"].items(), key=lambda kv: int(kv[0])):
            rows.append(f"| bicubic {b['side']}x{b['side']} px, {b['bits_per_channel']} bits/channel "
                        f"(budget of {k} bits/token) | - | {b['bits_per_image']} | 0 | {b['psnr']:.2f} "
                        f"| {b['ssim']:.3f} | - | - | - | - | {base['cpu_minutes']:.1f} (all three) |")
    for e in suite.experiments:
        if e.kind != "tokenizer" or e.name not in results:
            continue
        r = _seeds(results[e.name])
        col = lambda key: [x[key] for x in r]
        codes = 2 ** e.tokenizer.bits  # N tokens can show at most min(N, 2^K) distinct codes
        train_reach = [x["train_codebook_usage"] * codes / min(x["train_tokens"], codes) for x in r]
        rows.append(
            f"| `{e.name}` | {e.tokenizer.bits} | {r[0]['bits_per_image']} | {r[0]['parameters']:,} "
            f"| {fmt(col('psnr'))} | {fmt(col('ssim'), 3)} | {fmt(col('usage_of_reachable'), 1, 100, ' %')} "
            f"| {fmt(col('perplexity'), 0)} | {fmt(train_reach, 1, 100, ' %')} | {len(r)} "
            f"| {fmt(col('cpu_minutes'), 1)} |")
    return head + "\n".join(rows) + "\n"


def ar_table(suite: Suite, results: Results) -> str:
    head = ("| run | sub-token bits | inter N | intra L | parameters | held-out NLL (nats / token) "
            "| held-out NLL (bits / token) | per sub-token (nats) | final train loss | seeds | CPU minutes per run |\n"
            "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|\n")
    rows = []
    for e in suite.experiments:
        if e.kind != "ar" or e.name not in results:
            continue
        r = _seeds(results[e.name])
        col = lambda key: [x[key] for x in r]
        subs = " + ".join(fmt([x["subtoken_nats"][m] for x in r]) for m in range(len(e.ar.bits)))
        rows.append(
            f"| `{e.name}` | {' + '.join(map(str, e.ar.bits))} | {e.ar.n_inter} | {e.ar.n_intra} "
            f"| {r[0]['parameters']:,} | {fmt(col('nll_nats'), 3)} | {fmt(col('nll_bits'), 3)} | {subs} "
            f"| {fmt(col('final_train_loss'), 3)} | {len(r)} | {fmt(col('cpu_minutes'), 1)} |")
    return head + "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------ figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """The figure as a 256-colour PNG: a fraction of the bytes of a true-colour one, for docs that stay small."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _plt().close(fig)
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(256)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)
    return path


def _band(ax, runs: List[List[List[float]]], label: str, smooth: int = 1) -> None:
    """Mean curve over seeds with a min-max band (the seeds share their step grid)."""
    n = min(len(c) for c in runs)
    steps = np.asarray([p[0] for p in runs[0][:n]])
    vals = np.asarray([[p[1] for p in c[:n]] for c in runs])
    if smooth > 1:
        k = np.ones(smooth) / smooth
        vals = np.stack([np.convolve(v, k, mode="valid") for v in vals])
        steps = steps[smooth - 1:]
    line, = ax.plot(steps, vals.mean(0), label=label, lw=1.4)
    if len(runs) > 1:
        ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.2, lw=0)


def curves_figure(suite: Suite, results: Results, kind: str, panels: Sequence[Tuple[str, str, int]],
                  path: Path, reference: Optional[Tuple[float, str]] = None) -> Optional[Path]:
    """One panel per (curve key, title, moving-average width); ``reference``: a dashed level on panel 1."""
    names = [e.name for e in suite.experiments if e.kind == kind and e.name in results]
    if not names:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.2), dpi=90)
    for ax, (key, title, smooth) in zip(np.atleast_1d(axes), panels):
        for name in names:
            runs = [r["curves"][key] for r in _seeds(results[name]) if r["curves"].get(key)]
            if runs and min(len(c) for c in runs) >= smooth:
                _band(ax, runs, name, smooth)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if reference is not None:
        np.atleast_1d(axes)[0].axhline(reference[0], color="k", ls="--", lw=1, label=reference[1])
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _strip(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> one uint8 row, 2 px white gaps."""
    arr = to_uint8_nhwc(images)
    n, h, w, c = arr.shape
    row = np.full((h, n * (w + 2) - 2, c), 255, np.uint8)
    for i in range(n):
        row[:, i * (w + 2): i * (w + 2) + w] = arr[i]
    return row


def recon_figure(suite: Suite, results: Results, heldout: torch.Tensor, path: Path, n: int = 12) -> Optional[Path]:
    """Held-out originals, the 18-bit bicubic baseline, and each tokenizer (seed 0), one row each."""
    from stage1_tokenizer.tokenizer import Tokenizer

    pick = heldout[np.linspace(0, len(heldout) - 1, min(n, len(heldout))).round().astype(int)]
    rows = [("original", pick)]
    base = results.get("tok-bicubic", {}).get("-")
    if base and "18" in base["budgets"]:
        b = base["budgets"]["18"]
        rows.append((f"bicubic {b['side']}px {b['bits_per_channel']}b", compress(pick, b["side"], b["bits_per_channel"])))
    for e in suite.experiments:
        if e.kind == "tokenizer" and e.name in results:
            first = _seeds(results[e.name])[0]
            rows.append((e.name, Tokenizer.from_checkpoint(first["checkpoint"]).reconstruct(pick).clamp(-1, 1)))
    if len(rows) < 2:
        return None
    plt = _plt()
    strips = [(label, np.repeat(np.repeat(_strip(x), 2, 0), 2, 1)) for label, x in rows]
    h, w = strips[0][1].shape[:2]
    fig, axes = plt.subplots(len(strips), 1, figsize=(w / 90 + 1.6, len(strips) * (h / 90 + 0.12)), dpi=90)
    for ax, (label, img) in zip(axes, strips):
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.2, right=0.99, top=0.99, bottom=0.01, hspace=0.08)
    return _save(fig, path)


def samples_figure(suite: Suite, results: Results, path: Path, reference: Optional[str] = None) -> Optional[Path]:
    """The seed-0 class-conditional grid of every AR run, side by side (one row per class), after the
    ``reference`` grid (held-out tokens decoded) when given."""
    from PIL import Image

    panels = [(e.name, np.asarray(Image.open(_seeds(results[e.name])[0]["samples"]).convert("RGB")))
              for e in suite.experiments if e.kind == "ar" and e.name in results]
    if not panels:
        return None
    if reference is not None:
        panels.insert(0, ("held-out tokens", np.asarray(Image.open(reference).convert("RGB"))))
    plt = _plt()
    h, w = panels[0][1].shape[:2]
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (w / 90 + 0.2), h / 90 + 0.4), dpi=90)  # ~1:1 pixels
    for ax, (name, img) in zip(np.atleast_1d(axes), panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def write(out: Path, suite: Suite, results: Results, heldout: Optional[torch.Tensor],
          ar_reference: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """OUT/tables.md, OUT/results.json and OUT/figures/*.png from ``results``; ``ar_reference``: the
    tokenizer's own view of the AR held-out set (``autoregressive.reference``)."""
    figs = out / "figures"
    base = results.get("tok-bicubic", {}).get("-", {}).get("budgets", {}).get("18")
    ref = (base["psnr"], "bicubic, 18-bit budget") if base else None
    made = {
        "tok-curves": curves_figure(suite, results, "tokenizer", [("val/psnr", "held-out PSNR (dB), EMA weights", 1),
                                                                  ("g/l1", "training L1 (moving average of 5 logs)", 5)],
                                    figs / "tok-curves.png", ref),
        "tok-recon": recon_figure(suite, results, heldout, figs / "tok-recon.png") if heldout is not None else None,
        "ar-curves": curves_figure(suite, results, "ar", [("nll_nats", "held-out NLL (nats / token)", 1),
                                                          ("loss", "training loss (moving average of 3 logs)", 3)],
                                   figs / "ar-curves.png"),
        "ar-samples": samples_figure(suite, results, figs / "ar-samples.png",
                                     ar_reference["grid"] if ar_reference else None),
    }
    tables = {"tokenizer": tokenizer_table(suite, results), "ar": ar_table(suite, results)}
    text = ("## Tokenizer ablations (held-out photo crops)\n\n" + tables["tokenizer"]
            + "\n## AR ablations (held-out Fashion-MNIST tokens)\n\n" + tables["ar"])
    if ar_reference:
        text += (f"\nThe AR runs' tokenizer on the {ar_reference['images']} held-out Fashion-MNIST images: PSNR "
                 f"{ar_reference['psnr']:.2f} dB, SSIM {ar_reference['ssim']:.3f}.\n")
    atomic.write_text(out / "tables.md", text)
    summary = {"figures": {k: str(v) for k, v in made.items() if v is not None}, "tables": tables,
               "ar_reference": ar_reference, "results": results}
    atomic.write_text(out / "results.json", json.dumps(summary, indent=1) + "\n")
    return summary
