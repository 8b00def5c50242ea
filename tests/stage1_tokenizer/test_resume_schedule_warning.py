"""A resume that changes schedule keys says which and what it does; a warm-up longer than the run warns."""
from shared.config import resolve
from shared.device import init_distributed
from stage1_tokenizer.train import Trainer
from stage1_tokenizer.train_config import PRESETS, TrainConfig


def _fit(out, root, *overrides):
    cfg = resolve(TrainConfig, PRESETS, "tokenizer-tiny", [f"data.root={root}", f"out_dir={out}", "data.resolution=16",
                                                           "data.num_workers=0", "tensorboard=false", *overrides])
    trainer = Trainer(cfg, init_distributed("cpu"))
    trainer.fit()
    return trainer


def test_resume_with_a_longer_run_names_the_key_and_re_derives_the_schedule(tmp_path, photos, capfd, one_thread):
    _fit(tmp_path, photos, "max_steps=2", "optim.warmup_steps=3")
    err = capfd.readouterr().err
    assert "the warm-up (3 steps) is longer than the run (2 steps): the LR never reaches its peak" in err
    t = _fit(tmp_path, photos, "max_steps=3", "optim.warmup_steps=3", "optim.lr=0.002")
    err = capfd.readouterr().err
    assert "max_steps changed 2 -> 3: the run's length and LR schedule are re-derived from the new value" in err
    assert "optim.lr changed 0.001 -> 0.002: not applied: the resumed optimiser keeps the checkpoint's peak LR" in err
    assert "warm-up" not in err and t.step == 3  # 3 steps of warm-up in a 3-step run: no warning
