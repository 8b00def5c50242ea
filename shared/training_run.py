"""The plumbing around a trainer's own step, shared by both stages (a few calls, not a framework).

    run = TrainingRun(cfg, info)                   # checks the run settings and out_dir, before any work
    ... build model, optimisers, loaders ...
    with run:                                      # cleans kill leftovers, installs the SIGTERM/SIGINT handler
        path = run.resume_path()                   # resume=auto|never|PATH, the same in both stages
        state, mine = run.load_state(path, ...)    # the one resume rule (world size, micro-batch) of both stages
        run.begin(step)                            # OUT/config.yaml and the run logger, once resume succeeded
        while True:
            step = train_one_step(...)
            if run.log_due(step, total): run.logger.scalars(step, collectives.mean_over_ranks(stats))
            if run.end_of_step(step, total, save):  # periodic / final / preemption / stop_after checkpoints
                break                              # save() calls run.save(...): the one checkpoint layout
    return run.exit_code                           # 0, or 128 + signal after a preemption stop

Both stages' trainers have this shape: ``Trainer(cfg, info)`` builds everything and writes no run file,
``fit()`` resumes and runs the loop above, ``train_step(...)`` is one optimiser step, ``save()`` / ``load(path)``
write and read a ``step-*`` checkpoint.

The decision in ``end_of_step`` is taken on every rank after the same step (one all-reduce of the signal),
so all ranks stop together and the checkpoint they write is the one a rerun of the same command resumes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch

from shared import collectives
from shared.atomic import check_output_dir
from shared.checkpoint import CheckpointError, load_meta, load_trainer_state
from shared.config import known_keys, save_config, to_dict, train_main  # noqa: F401  (train_main: the trainers' command line)
from shared.device import DistInfo
from shared.preemption import Preemption
from shared.rng import rng_state
from shared.run_checkpoints import clean_leftovers, find_resume, save_training_checkpoint
from shared.run_config import PRECISIONS, RunConfig, check_run_config
from shared.runlog import RunLogger, get_logger

CONFIG_FILE = "config.yaml"
# What a resume does with a changed schedule key (the trainers name their keys: ``TrainingRun(schedule_keys=)``)
RESCHEDULED = "the run's length and LR schedule are re-derived from the new value; the steps done are kept"
PEAK_KEPT = "not applied: the resumed optimiser keeps the checkpoint's peak LR (start a fresh run to change it)"
log = get_logger("shared.training_run")


class TrainingRun:
    def __init__(self, cfg: RunConfig, info: DistInfo, precisions: Sequence[str] = PRECISIONS,
                 schedule_keys: Mapping[str, str] = {}):
        check_run_config(cfg, precisions)
        self.cfg, self.info = cfg, info
        self.schedule_keys = dict(schedule_keys)  # dotted key -> what a resume that changes it does
        self.out = Path(cfg.out_dir)
        # every rank, before any work (loaders may cache under out_dir): a file at out_dir or an unwritable one
        # fails all ranks at once, in one line
        check_output_dir(self.out, owned=lambda _: True, replaced=False)
        if cfg.resume not in ("auto", "never"):
            find_resume(cfg.resume, self.out)  # a named checkpoint is checked now too, before anything is built
        self.stop = Preemption()
        self.logger: Optional[RunLogger] = None
        self.start_step = 0

    def __enter__(self) -> "TrainingRun":
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

    def load_state(self, path: Path, micro_batch: int, *,
                   global_data: bool) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
        """``path``'s trainer state and this rank's entry of it (``{"rng", "data"}``), by the resume rule of both
        stages: a checkpoint written by as many processes with the same micro-batch resumes exactly (every rank
        takes back its own RNG streams and data position). Another combination cannot resume exactly: it is
        refused, unless the trainer's data position is one global stream whatever the ranks (``global_data``:
        Stage 2's Streaming loader), where the data order still resumes exactly; then the entry is None and
        the trainer re-seeds its RNG streams (a warning says so)."""
        st = load_trainer_state(path)
        if st is None:
            raise CheckpointError(f"{path} has no trainer_state.pt")
        if self.info.is_main:
            for line in schedule_changes(load_meta(path).get("extra", {}).get("train_config"), self.cfg,
                                         self.schedule_keys):
                log.warning("resuming %s: %s", path.name, line)
        world, mb = st["world_size"], st.get("micro_batch", micro_batch)  # checkpoints before the key: as now
        if world == self.info.world_size and mb == micro_batch:
            return st, st["ranks"][self.info.rank]
        if not global_data:
            raise CheckpointError(
                f"{path} was written by {world} processes with micro_batch {mb}; exact "
                f"resume needs the same (now {self.info.world_size} x {micro_batch})")
        log.warning("resuming with %d process(es) x micro_batch %d from a run of %d x %d: the data order resumes "
                    "exactly, the RNG streams (dropout) are re-seeded", self.info.world_size, micro_batch, world, mb)
        return st, None

    def save(self, step: int, *, kind: str, weights: Callable[[], Mapping[str, torch.Tensor]],
             trainer_state: Callable[[], Dict[str, Any]], model_config: Any, loader: Any,
             extra: Optional[Dict[str, Any]] = None) -> Path:
        """Collective: ``OUT/step-NNNNNNNN`` in the layout of both stages. config.json holds the model's config
        (what the model's ``from_checkpoint`` rebuilds it from) and, under ``extra``, the whole training config;
        trainer_state.pt holds ``trainer_state()`` with the step, the world size and every rank's RNG states
        and data position (``loader.state_dict()``)."""
        path = save_training_checkpoint(
            self.out, step, kind=kind, weights=weights, trainer_state=trainer_state,
            per_rank={"rng": rng_state(), "data": loader.state_dict()}, config=to_dict(model_config),
            keep_last=self.cfg.keep_last, is_main=self.info.is_main,
            extra={"train_config": to_dict(self.cfg), **(extra or {})})
        if self.info.is_main:
            log.info("saved %s", path)
        return path

    def begin(self, step: int) -> RunLogger:
        """Start logging at ``step`` (0, or the resumed step): writes OUT/config.yaml on rank 0."""
        self.start_step = step
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / CONFIG_FILE)
        tracker = {**to_dict(self.cfg.wandb), "config": to_dict(self.cfg)} if self.cfg.tracker == "wandb" else None
        self.logger = RunLogger(self.out, self.info.rank, tensorboard=self.cfg.tensorboard, wandb=tracker)
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


def schedule_changes(saved: Optional[Mapping[str, Any]], cfg: Any, keys: Mapping[str, str]) -> List[str]:
    """One line per schedule key whose value differs between a checkpoint's saved training config and ``cfg``:
    ``max_steps changed 100 -> 200: <what the resume does>``. Nothing when the checkpoint saved no config."""
    if not saved:
        return []
    now = known_keys(cfg)
    lines = []
    for key, effect in keys.items():
        old: Any = saved
        for part in key.split("."):
            old = old.get(part) if isinstance(old, Mapping) else None
        new = now.get(key)
        if old is None or new is None:
            continue
        if (list(old) if isinstance(old, (list, tuple)) else old) != (list(new) if isinstance(new, tuple) else new):
            lines.append(f"{key} changed {old} -> {new}: {effect}")
    return lines


def warn_long_warmup(warmup: int, total: int, effect: str) -> None:
    """A warm-up longer than the run is allowed (short test runs) but almost never meant: say what happens."""
    if warmup > total:
        log.warning("the warm-up (%d steps) is longer than the run (%d steps): %s", warmup, total, effect)


def steps_per_epoch(images: int, global_batch: int) -> int:
    """Optimiser steps an LR schedule counts per epoch: ceil(images / global batch), the official count.

    The official trainers (Lightning, DistributedSampler without drop_last) end every epoch with a short
    batch: ceil(ceil(N / ranks) / per-device batch) steps, which for ImageNet's 1,281,167 images is
    ceil(N / global batch) at the released device counts (5005 at 256 = 8 x 32 for the tokenizer, 1669 at
    768 for the AR models). Our loaders keep every step at the full global batch (exact resumption), so the
    schedule's steps run across epoch boundaries: the same steps, a fraction of a batch more images each epoch.
    """
    return max(1, -(-int(images) // int(global_batch)))


def run_length(max_steps: int, epochs: float, steps_per_epoch: int) -> int:
    """Optimiser steps of a run: ``max_steps`` when > 0, else ``epochs`` epochs (rounded, at least one step)."""
    return max_steps if max_steps > 0 else max(1, round(epochs * steps_per_epoch))
