"""The plumbing around a trainer's own step, shared by both stages (a few calls, not a framework).

    with TrainingRun(cfg, info) as run:            # cleans kill leftovers, installs the SIGTERM/SIGINT handler
        path = run.resume_path()                   # resume=auto|never|PATH, the same in both stages
        ... load path, build loaders ...
        run.begin(step)                            # OUT/config.yaml and the run logger, once resume succeeded
        while True:
            step = train_one_step(...)
            if run.log_due(step, total): run.logger.scalars(step, collectives.mean_over_ranks(stats))
            if run.end_of_step(step, total, save):  # periodic / final / preemption / stop_after checkpoints
                break
    return run.exit_code                           # 0, or 128 + signal after a preemption stop

The decision in ``end_of_step`` is taken on every rank after the same step (one all-reduce of the signal),
so all ranks stop together and the checkpoint they write is the one a rerun of the same command resumes.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Type

import torch

from shared import collectives
from shared.atomic import check_output_dir
from shared.checkpoint import CheckpointError
from shared.config import ConfigError, add_config_args, from_args, save_config
from shared.device import DistInfo
from shared.preemption import Preemption
from shared.run_checkpoints import clean_leftovers, find_resume
from shared.run_config import PRECISIONS, RunConfig, check_run_config
from shared.runlog import RunLogger, get_logger

CONFIG_FILE = "config.yaml"
log = get_logger("shared.training_run")


class TrainingRun:
    def __init__(self, cfg: RunConfig, info: DistInfo, precisions: Sequence[str] = PRECISIONS):
        check_run_config(cfg, precisions)
        self.cfg, self.info = cfg, info
        self.out = Path(cfg.out_dir)
        self.stop = Preemption()
        self.logger: Optional[RunLogger] = None
        self.start_step = 0

    def __enter__(self) -> "TrainingRun":
        # every rank, before any work: a file at out_dir or an unwritable one fails all ranks at once, in one line
        check_output_dir(self.out, owned=lambda _: True, replaced=False)
        if self.info.is_main:
            for p in clean_leftovers(self.out):
                log.info("removed %s (left by an interrupted checkpoint write or prune)", p.name)
        collectives.barrier()  # nobody looks for checkpoints while rank 0 is cleaning
        self.stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.__exit__(*exc)
        if self.logger is not None:
            self.logger.close()

    def resume_path(self) -> Optional[Path]:
        return find_resume(self.cfg.resume, self.out)

    def begin(self, step: int) -> RunLogger:
        """Start logging at ``step`` (0, or the resumed step): writes OUT/config.yaml on rank 0."""
        self.start_step = step
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / CONFIG_FILE)
        self.logger = RunLogger(self.out, self.info.rank, tensorboard=self.cfg.tensorboard)
        return self.logger

    def log_due(self, step: int, total: int) -> bool:
        return step % self.cfg.log_every == 0 or step >= total

    def end_of_step(self, step: int, total: int, save: Callable[[], Any]) -> bool:
        """Checkpoint when due and say whether to leave the loop (end, preemption, ``stop_after``)."""
        cfg = self.cfg
        last = step >= total
        saved = step % cfg.ckpt_every == 0 or last
        if saved:
            save()
        if last:
            return True
        if self.stop.should_stop(self.info):  # every step, on every rank: all stop after the same step
            if not saved:
                save()
            log.warning("preempted (%s): stopped after step %d with a checkpoint; resume with the same command",
                        self.stop.signal_name, step)
            return True
        if cfg.stop_after > 0 and step - self.start_step >= cfg.stop_after:
            if not saved:
                save()
            log.info("stopping after %d steps (stop_after) at step %d; resume with the same command",
                     step - self.start_step, step)
            return True
        return False

    @property
    def exit_code(self) -> int:
        """0 when the run ended or stopped as asked; 128 + signal (143: SIGTERM) after a preemption stop."""
        return self.stop.exit_code


def train_main(
    argv: Optional[List[str]],
    *,
    prog: str,
    doc: str,
    config_cls: Type,
    presets: Mapping[str, Any],
    default: str,
    run: Callable[[Any], int],
    errors: Tuple[Type[BaseException], ...] = (),
) -> int:
    """The command line of every trainer: ``--config PRESET|FILE key=value ...``; bad input is one line."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.strip().split("\n")[0])
    add_config_args(parser, default=default)
    args = parser.parse_args(argv)
    try:
        cfg = from_args(config_cls, presets, args)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        return run(cfg)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, *errors) as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None
