"""Run a module's CLI with every collective of ``shared.collectives`` recorded, one JSON file per rank.

    python tests/support/collective_trace.py TRACE_DIR MODULE [ARGS...]      (under torchrun, or alone)

Installs ``shared.collectives.observer`` (called with every tensor handed to a torch.distributed collective)
and wraps the object collectives and the barrier, which hand torch no tensor of ours, so their calls are
listed too. Each record is ``[name, device of the tensor or null, collectives.collective_device() at the
call]``. The module runs as ``python -m MODULE ARGS`` would (``runpy``, run_name "__main__"); its exit status
is kept, and TRACE_DIR/rank-<RANK>.json is written whatever the outcome.

``--force-group BACKEND`` before TRACE_DIR initialises a process group of that backend even for one rank and
makes ``collectives.active()`` true, so every collective reaches torch.distributed: how one GPU checks that
NCCL is only handed CUDA tensors (a one-rank group's collectives are the identity on the values).
"""
from __future__ import annotations

import functools
import json
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from shared import atomic, collectives  # noqa: E402


def _caller() -> str:
    """``path:function`` of the nearest frame outside this file and shared/collectives.py."""
    f = sys._getframe(2)
    while f is not None and Path(f.f_code.co_filename).resolve() in (Path(__file__).resolve(),
                                                                   Path(collectives.__file__).resolve()):
        f = f.f_back
    if f is None:
        return "?"
    path = Path(f.f_code.co_filename).resolve()
    where = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name
    return f"{where}:{f.f_code.co_name}"


def _record(records: list, name: str, device) -> None:
    import torch.distributed as dist

    records.append({"name": name, "device": None if device is None else str(device),
                    "group_device": str(collectives.collective_device()), "backend": str(dist.get_backend()),
                    "caller": _caller()})


def install(records: list) -> None:
    collectives.observer = lambda name, t: _record(records, name, t.device)
    for name in ("gather_objects", "broadcast_object", "barrier"):
        fn = getattr(collectives, name)

        @functools.wraps(fn)
        def traced(*args, _fn=fn, _name=name, **kwargs):
            if collectives.active():  # on one process these are the identity: nothing reaches torch
                _record(records, _name, None)
            return _fn(*args, **kwargs)

        setattr(collectives, name, traced)


def force_group(backend: str) -> None:
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)  # torchrun's environment (MASTER_ADDR, RANK, WORLD_SIZE)
    collectives.active = lambda: True


def main() -> int:
    argv = sys.argv[1:]
    if argv[0] == "--force-group":
        force_group(argv[1])
        argv = argv[2:]
    trace_dir, module, args = Path(argv[0]), argv[1], argv[2:]
    records: list = []
    install(records)
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    finally:
        rank = int(os.environ.get("RANK", 0))
        atomic.write_text(trace_dir / f"rank-{rank}.json", json.dumps(
            {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", 1)), "records": records}) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
