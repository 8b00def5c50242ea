"""The config is discoverable: --help lists the presets, --print-config prints the resolved config and exits
without starting anything, an unknown key names the closest one, a resume that changes schedule keys and a
warm-up longer than the run are warnings."""
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from shared import config as C
from shared.training_run import PEAK_KEPT, RESCHEDULED, schedule_changes, warn_long_warmup
from stage2_ar.lr_schedule import WarmupHoldDecay, build_scheduler, load_scheduler_state

REPO = Path(__file__).resolve().parents[2]
TRAINERS = {"stage1_tokenizer.train": ("stage1_tokenizer.train_config", "tokenizer-demo"),
            "stage2_ar.train": ("stage2_ar.train_config", "ar-B")}


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-4
    warmup_steps: int = 0


@dataclass(frozen=True)
class Cfg:
    max_steps: int = 10
    optim: Optim = field(default_factory=Optim)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", sorted(TRAINERS))
def test_help_lists_every_preset_and_print_config(module):
    r = _cli(module, "--help")
    assert r.returncode == 0, r.stderr
    presets = __import__(TRAINERS[module][0], fromlist=["PRESETS"]).PRESETS
    for name in presets:
        assert name in r.stdout
    assert "--print-config" in r.stdout and f"{TRAINERS[module][1]} (default)" in r.stdout


def test_print_config_prints_the_resolved_config_and_starts_nothing(tmp_path):
    from stage2_ar.train_config import PRESETS, TrainConfig

    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"preset": "ar-tiny", "seed": 7, "schedule": {"max_steps": 30}}))
    out = tmp_path / "never"
    r = _cli("stage2_ar.train", "--config", str(f), "--print-config", "optim.lr=0.002", f"out_dir={out}")
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    want = C.resolve(TrainConfig, PRESETS, str(f), ["optim.lr=0.002", f"out_dir={out}"])
    assert C.from_dict(TrainConfig, printed) == want
    assert printed["seed"] == 7 and printed["schedule"]["max_steps"] == 30 and printed["optim"]["lr"] == 0.002
    assert not out.exists() and r.stderr == ""  # no run directory, no log line: nothing was started


def test_print_config_runs_nothing_in_process(capsys):
    ran = []
    assert C.train_main(["--print-config", "max_steps=3"], prog="t", doc="t", config_cls=Cfg, presets={"p": Cfg()},
                        default="p", run=ran.append) == 0
    assert ran == [] and yaml.safe_load(capsys.readouterr().out) == {"max_steps": 3, "optim": {"lr": 1e-4,
                                                                                             "warmup_steps": 0}}


@pytest.mark.parametrize("override, hint", [
    ("optim.lrr=1", "optim.lr"),             # misspelt
    ("lr=1", "optim.lr"),                    # right name, wrong level
    ("warmup_step=5", "optim.warmup_steps"),  # misspelt and at the wrong level
    ("optimm.lr=1", "optim.lr"),             # a misspelt section
    ("max_step=5", "max_steps"),
])
def test_unknown_key_names_the_closest_one(override, hint):
    with pytest.raises(C.ConfigError, match=rf"unknown key .* \(did you mean '{hint}'\?\)"):
        C.resolve(Cfg, {}, None, [override])


def test_unknown_key_on_the_command_line_is_one_line():
    r = _cli("stage1_tokenizer.train", "--config", "tokenizer-tiny", "optim.warmup_step=5")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "error: unknown key 'optim.warmup_step' for TrainConfig (did you mean 'optim.warmup_steps'?)"]


def test_unknown_key_in_a_yaml_file_is_named_too(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(C.ConfigError, match="'optim.lrr'.*did you mean 'optim.lr'"):
        C.resolve(Cfg, {}, str(f), [])


def test_schedule_changes_name_each_changed_key_and_what_a_resume_does():
    saved = C.to_dict(Cfg(max_steps=100))
    keys = {"max_steps": RESCHEDULED, "optim.warmup_steps": RESCHEDULED, "optim.lr": PEAK_KEPT}
    assert schedule_changes(saved, Cfg(max_steps=100), keys) == []
    lines = schedule_changes(saved, Cfg(max_steps=200, optim=Optim(lr=5e-4)), keys)
    assert lines == [f"max_steps changed 100 -> 200: {RESCHEDULED}", f"optim.lr changed 0.0001 -> 0.0005: {PEAK_KEPT}"]
    assert "re-derived from the new value" in RESCHEDULED
    assert schedule_changes(None, Cfg(), keys) == []  # a checkpoint without a saved config: nothing to compare


def test_a_resumed_schedule_is_re_derived_from_the_new_length(tmp_path):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(opt, WarmupHoldDecay(100, 10))
    for _ in range(50):
        opt.step()
        sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    opt2 = torch.optim.AdamW([p], lr=1e-3)
    sched2 = build_scheduler(opt2, WarmupHoldDecay(200, 10))  # max_steps 100 -> 200 on resume
    load_scheduler_state(sched2, torch.load(tmp_path / "s.pt", weights_only=True))
    assert sched2.lr_lambdas[0].total_steps == 200 and sched2.last_epoch == 50
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * WarmupHoldDecay(200, 10)(50))


def test_a_warm_up_longer_than_the_run_is_a_warning(capfd):
    warn_long_warmup(10, 20, "never shown")
    warn_long_warmup(50, 20, "the LR never reaches its peak")
    err = capfd.readouterr().err
    assert "never shown" not in err
    assert "WARNING" in err and "the warm-up (50 steps) is longer than the run (20 steps): the LR never reaches" in err
