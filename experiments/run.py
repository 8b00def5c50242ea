"""Run the ablations of docs/ablations.md and write their tables and figures.

    python -m experiments.run --all [--out runs/ablations] [--seeds 0,1]
    python -m experiments.run tok-k10 tok-k18 ar-intra2 [--out DIR]
    python -m experiments.run --all --smoke --out runs/smoke      # the same code on tiny sizes (the test)
    python -m experiments.run --list

A finished run leaves OUT/runs/<name>/seed-<k>/result.json next to the config it ran with; a rerun with
the same config reuses it (an interrupted --all continues where it stopped); a run, photo set or token
dataset made with another config is replaced only with ``--overwrite``. Then OUT/tables.md, OUT/results.json
and OUT/figures/*.png are rebuilt from every result in OUT.

It deletes or replaces only what it made: OUT holds a marker file (``.experiments-run``) from the first run,
each directory it may replace one as well; an OUT that holds anything else is refused. Every argument is
checked before any work, and a refusal is one ``error: ...`` line.
AR runs need the token dataset, which needs the ``ar_tokenizer`` run (seed 0): both are made on demand.
Training uses one torch thread (``--threads``) and the CPU, so that a run's minutes mean the same thing.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from experiments.presets import SUITES, Experiment, Suite
from shared import atomic

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CONFIG, RESULT = "config.json", "result.json"
MARK = ".experiments-run"  # in OUT and in every directory this tool may replace: it made them


class Refused(RuntimeError):
    """What this tool must not do (replace another's files, or its own without --overwrite); one line."""


def _marked(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    atomic.write_text(d / MARK, "made by python -m experiments.run; it may replace what is in this directory\n")
    return d


def fresh_dir(d: Path, key: Any, overwrite: bool) -> Path:
    """``d`` empty and marked as this tool's, for the output of config ``key``: a directory this tool did
    not make is refused; its own, made with another config, is replaced only with ``overwrite`` (one a
    killed run left before its config was written is replaced, it holds nothing finished)."""
    if d.is_dir() and any(d.iterdir()):
        if not (d / MARK).is_file():
            raise Refused(f"{d} holds files this tool did not make; move them away or choose another --out")
        if (d / CONFIG).is_file() and _read(d / CONFIG) != key and not overwrite:
            raise Refused(f"{d} holds an output of another configuration; pass --overwrite to replace it, "
                          "or choose another --out")
        shutil.rmtree(d)
    elif d.exists() and not d.is_dir():
        raise Refused(f"{d} is a file this tool did not make; move it away or choose another --out")
    return _marked(d)


def _plain(obj: Any) -> Any:
    """Dataclasses and tuples as JSON values, so a saved config compares equal to a fresh one."""
    return json.loads(json.dumps(asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj))


class Runner:
    def __init__(self, suite: Suite, out: Path, fm_root: Path, overwrite: bool = False):
        self.suite, self.out, self.fm_root, self.overwrite = suite, out, fm_root, overwrite

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    # ------------------------------------------------------------------ inputs
    def photos(self) -> Path:
        from experiments import photos

        root = self.out / "photos"
        key = _plain(self.suite.photos)
        if _read(root / CONFIG) != key:
            fresh_dir(root, key, self.overwrite)
            counts = photos.build(root, self.suite.photos)
            atomic.write_text(root / "counts.json", json.dumps(counts, indent=1) + "\n")
            atomic.write_text(root / CONFIG, json.dumps(key) + "\n")
        return root

    def run_dir(self, exp: Experiment, seed: Optional[int]) -> Path:
        return self.out / "runs" / exp.name / ("all" if seed is None else f"seed-{seed}")

    def key(self, exp: Experiment, seed: Optional[int]) -> Dict[str, Any]:
        key = {"experiment": _plain(exp), "seed": seed}
        if exp.kind == "ar":
            tok = self.suite.get(self.suite.ar_tokenizer)
            key.update(fashion=_plain(self.suite.fashion), tokenizer=self.key(tok, 0))
        else:
            key["photos"] = _plain(self.suite.photos)
        return key

    def tokens(self) -> Path:
        """The Fashion-MNIST token dataset of the AR runs (made once per tokenizer and data config)."""
        from experiments import autoregressive

        tok_exp = self.suite.get(self.suite.ar_tokenizer)
        ckpt = Path(self.result(tok_exp, 0)["checkpoint"])
        root = self.out / "ar-data"
        key = {"fashion": _plain(self.suite.fashion), "tokenizer": self.key(tok_exp, 0)}
        if _read(root / CONFIG) != key:
            if not (self.fm_root / "train-images-idx3-ubyte.gz").is_file():
                raise SystemExit(f"error: no Fashion-MNIST IDX files in {self.fm_root}: install Debian's "
                                 "'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or pass --fmnist-root")
            fresh_dir(root, key, self.overwrite)
            self.say(f"token dataset: Fashion-MNIST encoded by {tok_exp.name} (seed 0) with the Ray job")
            autoregressive.build_dataset(self.suite.fashion, self.fm_root, ckpt, root, self.suite.encode_cpus)
            atomic.write_text(root / CONFIG, json.dumps(key) + "\n")
        return root / "tokens"

    # ------------------------------------------------------------------ runs
    def result(self, exp: Experiment, seed: Optional[int]) -> Dict[str, Any]:
        """The run's result: from its result.json when it ran with this config, else by running it now."""
        d = self.run_dir(exp, seed)
        key = self.key(exp, seed)
        done = _read(d / RESULT)
        if done is not None and done.get("config") == key:
            return done["result"]
        if _read(d / CONFIG) != key:  # a different config's leftovers must not be resumed
            fresh_dir(d, key, self.overwrite)
            atomic.write_text(d / CONFIG, json.dumps(key) + "\n")
        if exp.kind == "ar":
            self.tokens()  # its prerequisites first, so that the CPU time below is the run's own
        self.say(f"{exp.name}" + ("" if seed is None else f" seed {seed}") + f": {exp.what}")
        cpu = cpu_seconds()
        result = self._execute(exp, seed, d)
        result["cpu_minutes"] = (cpu_seconds() - cpu) / 60
        atomic.write_text(d / RESULT, json.dumps({"config": key, "result": result}, indent=1) + "\n")
        self.say(f"{exp.name} done: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()
                                                  if isinstance(v, float) and k in SHOWN))
        return result

    def _execute(self, exp: Experiment, seed: Optional[int], d: Path) -> Dict[str, Any]:
        size = self.suite.photos.size
        if exp.kind == "baseline":
            from experiments import baseline
            from experiments.tokenizers import images_of

            photos = self.photos()
            train, held = images_of(photos / "train", size), images_of(photos / "heldout", size)
            h, w = exp.tokenizer.model().latent_shape(size, size)
            return {"budgets": {str(k): baseline.evaluate(train, held, h * w * k) for k in exp.baseline_bits}}
        if exp.kind == "tokenizer":
            from experiments import tokenizers

            return tokenizers.run(exp.tokenizer, seed, self.photos(), d / "train", size)
        from experiments import autoregressive

        tok_ckpt = Path(self.result(self.suite.get(self.suite.ar_tokenizer), 0)["checkpoint"])
        return autoregressive.run(exp.ar, seed, self.tokens(), tok_ckpt, d)

    def ar_reference(self, results: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Held-out tokens decoded and the tokenizer's PSNR on them, once some AR run has a result."""
        from experiments import autoregressive

        tok = results.get(self.suite.ar_tokenizer, {}).get("0")
        data = self.out / "ar-data"
        if tok is None or not any(e.kind == "ar" and e.name in results for e in self.suite.experiments):
            return None
        per_class = next(e.ar.samples_per_class for e in self.suite.experiments if e.kind == "ar")
        return autoregressive.reference(data / "tokens", data / "fashion-mnist", Path(tok["checkpoint"]), per_class,
                                        self.suite.fashion.size, data / "heldout-decoded.png")

    def seeds_of(self, exp: Experiment, seeds: Sequence[int]) -> Sequence[Optional[int]]:
        return (None,) if exp.kind == "baseline" else seeds

    def collect(self) -> Dict[str, Dict[str, Dict[str, Any]]]:
        """Every result in OUT that matches the current config (seed "-" for the seedless baseline)."""
        found: Dict[str, Dict[str, Dict[str, Any]]] = {}
        for exp in self.suite.experiments:
            for d in sorted((self.out / "runs" / exp.name).glob("*")):
                seed = None if d.name == "all" else int(d.name.split("-")[1])
                done = _read(d / RESULT)
                if done is not None and done.get("config") == self.key(exp, seed):
                    found.setdefault(exp.name, {})["-" if seed is None else str(seed)] = done["result"]
        return found


SHOWN = ("psnr", "ssim", "perplexity", "nll_nats", "nll_bits", "train_minutes", "cpu_minutes")


def cpu_seconds() -> float:
    """CPU time of this process and of its finished subprocesses (the encode job): unlike the wall time,
    it does not grow when other jobs share the cores."""
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


def _read(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def seed_list(text: str) -> tuple:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def check_out(out: Path) -> None:
    """--out: a directory (or one to create) that can be written, and, when it holds anything, one this tool
    made (its marker); Refused otherwise. Writes nothing."""
    if out.exists() and not out.is_dir():
        raise Refused(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARK).is_file():
        some = ", ".join(sorted(p.name for p in out.iterdir())[:3])
        raise Refused(f"--out {out} holds files this tool did not make ({some}); choose a new or empty directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise Refused(f"--out {out}: {parent} is a file, not a directory")
    try:  # a probe, not os.access: that says yes to root on a read-only file system
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise Refused(f"--out {out}: {parent} is not writable ({e.strerror or e})") from None


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from dataprep import cli

    p = cli.Parser(prog="python -m experiments.run", description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="experiments to run (see --list)")
    p.add_argument("--all", action="store_true", help="every experiment of the suite")
    p.add_argument("--smoke", action="store_true", help="the smoke suite: tiny sizes, one seed, seconds per run")
    p.add_argument("--out", type=Path, default=Path("runs/ablations"))
    p.add_argument("--seeds", type=seed_list, default=None, help="comma-separated seeds (default: the suite's)")
    p.add_argument("--fmnist-root", type=Path, default=FMNIST, help="folder of the Fashion-MNIST IDX .gz files")
    p.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads (the stated budgets are for 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace this tool's own outputs in OUT that were made with another configuration")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    suite = SUITES["smoke" if args.smoke else "full"]
    if args.list:
        for e in suite.experiments:
            print(f"{e.name:<20} claim {e.claim:<5} {e.what}")
        return 0
    if not args.all and not args.names:
        raise SystemExit("error: name experiments to run, or --all (see --list)")
    try:
        chosen = list(suite.experiments) if args.all else [suite.get(n) for n in args.names]
        seeds = args.seeds or suite.seeds
        out = args.out.resolve()
        check_out(out)
    except (KeyError, Refused) as e:
        raise SystemExit(f"error: {e.args[0]}") from None
    if any(e.kind == "ar" for e in chosen) and not (args.fmnist_root / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"error: --fmnist-root {args.fmnist_root}: no Fashion-MNIST IDX files there (the AR runs "
                         "need them): install Debian's 'dataset-fashion-mnist' or pass the folder that holds them")
    import torch

    torch.set_num_threads(args.threads)
    runner = Runner(suite, out, args.fmnist_root, args.overwrite)
    try:
        if not (out / MARK).is_file():
            _marked(out)
        return _run_all(runner, suite, chosen, seeds)
    except (Refused, atomic.DiskFullError) as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # a path it cannot write or read after all: one line naming it
        if e.filename is None:
            raise
        raise SystemExit(f"error: {e.filename}: {e.strerror or e}") from None


def _run_all(runner: Runner, suite: Suite, chosen: Sequence[Experiment], seeds: Sequence[int]) -> int:
    t0, cpu0 = time.time(), cpu_seconds()
    for exp in chosen:
        for seed in runner.seeds_of(exp, seeds):
            runner.result(exp, seed)
    from experiments import report
    from experiments.tokenizers import images_of

    heldout = images_of(runner.photos() / "heldout", suite.photos.size)
    results = runner.collect()
    summary = report.write(runner.out, suite, results, heldout, runner.ar_reference(results))
    print("\n" + (runner.out / "tables.md").read_text())
    runner.say(f"all done in {(time.time() - t0) / 60:.1f} min of wall time, {(cpu_seconds() - cpu0) / 60:.1f} min of "
               f"CPU time; figures: {', '.join(summary['figures'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
