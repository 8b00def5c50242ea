"""Every command answers --help without importing anything heavy (torch, Streaming, Ray, Lance,
torchvision): the command line is parsed before those imports. The check is what is imported, not a wall
time (robust on a loaded machine); the measured times are in docs/benchmarks.md (bench/startup.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "streaming", "ray", "lance", "torchvision", "transformers")
COMMANDS = ["stage1_tokenizer.train", "stage1_tokenizer.evaluate", "stage1_tokenizer.reconstruct",
            "stage1_tokenizer.convert_official", "stage2_ar.train", "stage2_ar.sample", "stage2_ar.evaluate",
            "stage2_ar.convert_official", "dataprep.encode", "dataprep/encode.py", "dataprep.publish",
            "dataprep.inspect_dataset", "dataprep/inspect_dataset.py", "experiments.run", "scripts/demo.py"]

# runs one command as `python -m MODULE ARGS` / `python FILE ARGS` would, then lists the heavy modules loaded
PROBE = """
import contextlib, io, json, os, runpy, sys, time
target, heavy = sys.argv[1], sys.argv[2].split(",")
sys.argv = [target, *sys.argv[3:]]
t, code, out = time.perf_counter(), None, io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        if target.endswith(".py"):
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
print(json.dumps({"code": code, "seconds": time.perf_counter() - t, "help": out.getvalue(),
                  "heavy": [m for m in heavy if m in sys.modules]}))
"""


def probe(target: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, target, ",".join(HEAVY), *(args or ("--help",))], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", COMMANDS)
def test_help_imports_nothing_heavy(command):
    res = probe(command)
    assert res["code"] in (0, None) and "usage:" in res["help"], res
    assert res["heavy"] == [], f"{command} --help imported {res['heavy']}"
    print(f"{command} --help: {res['seconds']:.2f} s")


@pytest.mark.parametrize("command, preset", [("stage1_tokenizer.train", "tokenizer-tiny"), ("stage2_ar.train", "ar-tiny")])
def test_print_config_imports_nothing_heavy(command, preset):
    res = probe(command, "--config", preset, "--print-config", "seed=5")
    assert res["code"] == 0 and "\nseed: 5\n" in res["help"] and res["heavy"] == [], res
