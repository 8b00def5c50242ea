"""The optional Weights & Biases tracker (``tracker=wandb``): the same scalars and images as metrics.jsonl /
TensorBoard, checked in W&B's offline mode by reading the run's ``.wandb`` file (no server, no account)."""
import importlib.util
import sys

import pytest
import torch

from shared import runlog
from support.wandb_offline import finished_records, history
from shared.config import ConfigError
from shared.run_config import RunConfig, WandbConfig, check_run_config


def test_offline_run_holds_the_logged_scalars_and_images(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the dev extra installs it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = runlog.RunLogger(tmp_path, rank=0, wandb={"project": "tests", "mode": "offline",
                                                    "config": {"optim": {"lr": 3e-4}}})
    log.scalars(1, {"train/loss": torch.tensor(2.5), "lr": 1e-4})
    log.scalars(2, {"train/loss": 1.25})
    log.images(2, "samples", torch.zeros(4, 3, 6, 6), nrow=2)
    log.close()
    rows = history(tmp_path)
    assert rows[1]["train/loss"] == "2.5" and float(rows[1]["lr"]) == 1e-4
    assert rows[2]["train/loss"] == "1.25" and rows[2]["samples._type"] == '"image-file"'
    assert runlog.read_metrics(tmp_path / "metrics.jsonl")[1]["train/loss"] == 1.25  # JSONL and TB as before
    assert any((tmp_path / "tb").iterdir())
    run_id = (tmp_path / runlog.WANDB_ID_FILE).read_text().strip()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    # a resumed run (same out_dir) logs to the same W&B run id
    again = runlog.RunLogger(tmp_path, rank=0, wandb={"project": "tests", "mode": "offline"})
    again.scalars(3, {"train/loss": 1.0})
    again.close()
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files and all(f.name == f"run-{run_id}.wandb" for f in files)
    assert any(r.history.step.num == 3 for f in files for r in finished_records(f) if r.HasField("history"))
    # other ranks start no W&B run
    quiet = runlog.RunLogger(tmp_path / "r1", rank=1, wandb={"project": "tests"})
    quiet.scalars(1, {"x": 1.0})
    quiet.close()
    assert not (tmp_path / "r1").exists()


def test_tracker_settings_are_checked_before_the_run(monkeypatch):
    check_run_config(RunConfig())  # the default: no tracker
    with pytest.raises(ConfigError, match=r"^tracker must be one of none, wandb, got 'mlflow'$"):
        check_run_config(RunConfig(tracker="mlflow"))
    with pytest.raises(ConfigError, match=r"^tracker=wandb needs wandb.project=NAME$"):
        check_run_config(RunConfig(tracker="wandb"))
    with pytest.raises(ConfigError, match=r"^wandb.mode must be online or offline"):
        check_run_config(RunConfig(tracker="wandb", wandb=WandbConfig(project="p", mode="cloud")))
    check_run_config(RunConfig(tracker="wandb", wandb=WandbConfig(project="p")))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        check_run_config(RunConfig(tracker="wandb", wandb=WandbConfig(project="p")))
    assert str(e.value) == ("tracker=wandb needs the wandb package, which is not installed: pip install wandb "
                            "(or the project's dev extra), or use tracker=none")


def test_missing_package_at_start_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(runlog.TrackerError, match=r"^tracker=wandb needs the wandb package, which is not "
                                                  r"installed: pip install wandb, or use tracker=none$"):
        runlog.RunLogger(tmp_path, rank=0, wandb={"project": "p"})
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing logged
