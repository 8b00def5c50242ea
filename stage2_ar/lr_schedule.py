"""The official AR learning-rate schedule (VAR-derived), set every step from the global step.

    warm-up   steps [0, W):     linear from start_ratio * peak (0.005) to peak
    hold      first hold_frac (5 %) of the post-warm-up span: peak
    decay     the rest:         linear down to end_ratio * peak (0.1) at the last step

The official run counts the warm-up in epochs (6 for B/L, 7 for XL, of 300/350); we count it in steps
(epochs x steps per epoch), which is the same thing for a fixed dataset and global batch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class WarmupHoldDecay:
    """Multiplier of the peak LR at a given step (a picklable callable, so LambdaLR can save it)."""

    total_steps: int
    warmup_steps: int
    start_ratio: float = 0.005
    hold_frac: float = 0.05
    end_ratio: float = 0.1

    def __post_init__(self):
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps}), total >= 1")
        if not 0 <= self.hold_frac < 1:
            raise ValueError(f"hold_frac must lie in [0, 1), got {self.hold_frac}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_ratio + (1 - self.start_ratio) * step / self.warmup_steps
        span = max(1, self.total_steps - 1 - self.warmup_steps)  # the last step lands exactly on end_ratio
        progress = min(1.0, (step - self.warmup_steps) / span)
        if progress < self.hold_frac:
            return 1.0
        return self.end_ratio + (1 - self.end_ratio) * (1 - progress) / (1 - self.hold_frac)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: WarmupHoldDecay) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over every param group; its state_dict holds the step and the schedule's numbers."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Restore the step and re-apply its LR: LambdaLR.load_state_dict alone leaves the optimiser's LR stale
    until the next ``step()``, so a resumed first step would run at whatever LR the optimiser was built with.
    The schedule's numbers (length, warm-up) stay those ``scheduler`` was built with from the run's config: the
    same as the checkpoint's, unless a resume changed a schedule key, which is then re-derived (and warned)."""
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})  # None: keep ours
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def describe(schedule: WarmupHoldDecay) -> dict:
    return asdict(schedule)
