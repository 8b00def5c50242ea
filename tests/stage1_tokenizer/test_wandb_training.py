"""``tracker=wandb`` on a real (tiny, CPU) training run: the trainer's scalars and image grids reach the W&B run,
in offline mode, under the run directory, and the resolved config is the run's W&B config."""
import pytest

from shared.config import resolve
from shared.device import init_distributed
from shared.runlog import read_metrics
from stage1_tokenizer.train import Trainer
from stage1_tokenizer.train_config import PRESETS, TrainConfig
from support.wandb_offline import history


def test_trainer_logs_to_an_offline_wandb_run(tmp_path, photos, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = resolve(TrainConfig, PRESETS, "tokenizer-tiny",
                  [f"data.root={photos}", f"out_dir={out}", "max_steps=2", "ckpt_every=2", "data.num_workers=0",
                   "loss.perceptual_weight=0", "tracker=wandb", "wandb.project=tests", "wandb.mode=offline"])
    Trainer(cfg, init_distributed("cpu")).fit()
    logged = {k for row in history(out).values() for k in row}
    jsonl = {k for row in read_metrics(out / "metrics.jsonl") for k in row} - {"step", "time"}
    assert jsonl and jsonl <= logged  # every scalar of metrics.jsonl went to W&B too
    assert any(k.endswith("._type") for k in logged)  # and the image grid
