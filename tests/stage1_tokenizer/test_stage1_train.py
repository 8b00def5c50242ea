"""Stage-1 trainer on CPU with tokenizer-tiny: exact resume, export, schedule, config errors, learning."""
import math

import numpy as np
import pytest
import torch

from shared.checkpoint import load_meta, load_state_dict, load_trainer_state
from shared.run_checkpoints import step_dirs
from shared.config import ConfigError, resolve
from shared.device import init_distributed
from shared.runlog import read_metrics
from shared.training_run import steps_per_epoch
from stage1_tokenizer.tokenizer import Tokenizer
from stage1_tokenizer.train import Trainer, lr_factor, main
from stage1_tokenizer.train_config import PRESETS, TrainConfig


def _run(out, root, *overrides):
    cfg = resolve(TrainConfig, PRESETS, "tokenizer-tiny",
                  [f"data.root={root}", f"out_dir={out}", "max_steps=4", "ckpt_every=2", *overrides])
    trainer = Trainer(cfg, init_distributed("cpu"))
    trainer.fit()
    return trainer


def _losses(path):
    rows = {}
    for r in read_metrics(path / "metrics.jsonl"):
        if "g/loss" in r:
            rows[r["step"]] = (r["g/loss"], r["d/loss"], r["g/l1"], r["d/lecam"])
    return rows


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, photos):
    """The uninterrupted 4-step reference run (0 workers), shared by the tests below."""
    out = tmp_path_factory.mktemp("full")
    return out, _run(out, photos, "data.num_workers=0")


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_interrupted_run_resumes_exactly(tmp_path, photos, full_run, workers):
    """Cut after 2 of 4 steps, resume: the same losses and weights as the uninterrupted run.

    The reference run used 0 workers; with 2 workers the result must still be identical, because a sample's
    crop depends only on (seed, epoch, index).
    """
    full_dir = full_run[0]
    w = f"data.num_workers={workers}"
    _run(tmp_path / "cut", photos, w, "stop_after=2")
    assert [p.name for p in step_dirs(tmp_path / "cut")] == ["step-00000002"]
    assert not (tmp_path / "cut" / "final").exists()
    _run(tmp_path / "cut", photos, w)  # resume=auto picks up step-00000002
    full, cut = _losses(full_dir), _losses(tmp_path / "cut")
    assert sorted(full) == sorted(cut) == [1, 2, 3, 4]
    assert full == cut  # bit-identical losses, step for step
    a = load_state_dict(full_dir / "step-00000004")
    b = load_state_dict(tmp_path / "cut" / "step-00000004")
    assert a.keys() == b.keys() and {k.split(".")[0] for k in a} == {"generator", "ema", "discriminator"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_trainer_state(full_dir / "step-00000004"), load_trainer_state(tmp_path / "cut" / "step-00000004")
    assert sa["lecam"] == sb["lecam"] and sa["lecam"]["ema_real"] != 0
    if workers == 0:  # 4 steps x 2 micro-batches drawn from the loader
        assert sa["ranks"][0]["data"]["_num_yielded"] == sb["ranks"][0]["data"]["_num_yielded"] == 8
    assert sa["opt_g"]["state"][0]["exp_avg"].equal(sb["opt_g"]["state"][0]["exp_avg"])


def test_export_is_the_ema_tokenizer(full_run):
    out, trainer = full_run
    assert [p.name for p in step_dirs(out)] == ["step-00000002", "step-00000004"]
    tok = Tokenizer.from_checkpoint(out / "final")
    ema = {k[4:]: v for k, v in load_state_dict(out / "step-00000004").items() if k.startswith("ema.")}
    assert tok.state_dict().keys() == ema.keys()
    assert all(torch.equal(tok.state_dict()[k], ema[k]) for k in ema)
    raw = trainer.tok.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in ema)  # EMA differs from the raw weights
    assert load_meta(out / "final")["extra"]["source"] == "ema"
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert tok.encode(x).shape == (2, 8, 8)
    assert (out / "config.yaml").is_file() and list((out / "images").glob("*.png"))
    row = read_metrics(out / "metrics.jsonl")[-1]
    for key in ("g/grad_norm", "d/grad_norm", "lr/g", "codebook/batch_usage", "g/codebook_entropy", "train/psnr"):
        assert np.isfinite(row[key])


def test_run_exports_both_weight_sets(full_run):
    """final/ holds the EMA set (evaluation), final-raw/ the raw generator weights (encoding tokens for AR
    training, as the official recipe); each is a plain tokenizer checkpoint that names its set."""
    from stage1_tokenizer.exports import select

    out, trainer = full_run
    raw = {k[len("generator."):]: v for k, v in load_state_dict(out / "step-00000004").items()
           if k.startswith("generator.")}
    tok = Tokenizer.from_checkpoint(out / "final-raw")
    assert tok.state_dict().keys() == raw.keys() and all(torch.equal(tok.state_dict()[k], raw[k]) for k in raw)
    ema = Tokenizer.from_checkpoint(out / "final").state_dict()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    for name, weights in (("final", "ema"), ("final-raw", "raw")):
        extra = load_meta(out / name)["extra"]
        assert extra["weights"] == weights and extra["step"] == 4
    assert select(out) == (out / "final-raw", "raw")  # what dataprep encodes with by default


def test_gradient_accumulation_matches_one_big_batch(tmp_path, photos):
    """global_batch 4 as 2 micro-batches of 2 gives the gradient of one batch of 4.

    Entropy, BatchNorm and the GAN are batch statistics, so they are switched off for this comparison. The
    gradients are compared through Adam's first moment after one step (exp_avg = (1 - beta1) * grad); the
    updated weights themselves are not comparable, since Adam's first step is ~lr * sign(grad) and flips
    on rounding noise wherever a gradient is ~0.
    """
    common = ["loss.entropy_weight=0", "loss.gan_weight=0", "loss.disc_start=1000", "loss.perceptual_weight=0",
              "max_steps=2", "stop_after=1"]
    a = _run(tmp_path / "acc", photos, "data.micro_batch=2", *common)
    b = _run(tmp_path / "big", photos, "data.micro_batch=4", *common)
    assert a.accum == 2 and b.accum == 1
    names = [n for n, _ in a.tok.named_parameters()]
    ga = [a.opt_g.state[p]["exp_avg"] for p in a.tok.parameters()]
    gb = [b.opt_g.state[p]["exp_avg"] for p in b.tok.parameters()]
    scale = max(g.abs().max() for g in gb)
    for n, x, y in zip(names, ga, gb):
        assert torch.allclose(x, y, atol=1e-5 * scale, rtol=1e-4), n
    assert max((x - y).abs().max() for x, y in zip(ga, gb)) < 1e-5 * scale


def test_checkpoints_keep_the_last_k(tmp_path, photos):
    _run(tmp_path / "k", photos, "ckpt_every=1", "keep_last=2", "max_steps=3", "loss.perceptual_weight=0")
    assert [p.name for p in step_dirs(tmp_path / "k")] == ["step-00000002", "step-00000003"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps(tmp_path, photos, precision):
    trainer = _run(tmp_path / precision, photos, f"precision={precision}", "max_steps=2", "stop_after=1")
    assert trainer.step == 1 and [p.name for p in step_dirs(tmp_path / precision)] == ["step-00000001"]
    row = read_metrics(tmp_path / precision / "metrics.jsonl")[-1]
    assert np.isfinite(row["g/loss"]) and np.isfinite(row["d/loss"])
    st = load_trainer_state(tmp_path / precision / "step-00000001")
    assert bool(st["scaler_g"]) == (precision == "fp16")  # a GradScaler only for fp16


def test_lr_schedule_warmup_and_epoch_milestones():
    f = lambda s: lr_factor(s, spe=10, milestones=(2, 3), gamma=0.1, warmup=4)
    assert [f(s) for s in (0, 1, 3)] == pytest.approx([0.25, 0.5, 1.0])
    assert f(19) == 1.0 and f(20) == pytest.approx(0.1) and f(30) == pytest.approx(0.01)


def test_cli_errors_are_one_line(tmp_path, photos):
    with pytest.raises(SystemExit, match="error: .*data.root is required"):
        main(["--config", "tokenizer-tiny", f"out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="error: .*global_batch 5 is not a multiple"):
        main(["--config", "tokenizer-tiny", f"data.root={photos}", "data.global_batch=5", f"out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="error: .*unknown preset"):
        main(["--config", "nope"])
    with pytest.raises(SystemExit, match="error: .*no images"):
        (tmp_path / "empty").mkdir()
        main(["--config", "tokenizer-tiny", f"data.root={tmp_path / 'empty'}", f"out_dir={tmp_path / 'o'}"])


def test_presets_follow_the_official_recipe():
    big, small = PRESETS["tokenizer-16x-256"], PRESETS["tokenizer-8x-128"]
    assert big.loss.lecam_weight == 0.05 and small.loss.lecam_weight == 0.01
    assert big.optim.lr_milestones == (200, 250) and small.optim.lr_milestones == (250, 300)
    assert (big.epochs, small.epochs) == (270, 350)
    assert big.model.downsample_factor == 16 and small.model.downsample_factor == 8
    for cfg in (big, small):
        assert (cfg.optim.lr, cfg.optim.betas, cfg.data.global_batch) == (1e-4, (0.5, 0.9), 256)
        assert (cfg.loss.gan_weight, cfg.loss.entropy_weight, cfg.loss.commitment_weight) == (0.1, 0.1, 0.25)
        assert cfg.loss.disc_start == 0 and cfg.optim.ema_decay == 0.999 and not cfg.loss.lpips_random_trunk
        assert cfg.data.resolution == cfg.model.resolution


def _trainer(tmp_path, root, *overrides):
    cfg = resolve(TrainConfig, PRESETS, "tokenizer-tiny", [f"data.root={root}", f"out_dir={tmp_path}", *overrides])
    return Trainer(cfg, init_distributed("cpu"))


def test_epoch_is_ceil_of_images_over_global_batch_as_official(tmp_path, photos):
    """Lightning keeps the short last batch: ImageNet at 256 = 8 x 32 devices is ceil(ceil(N / 32) / 8) = 5005
    steps per epoch (not 5004); the LR milestones and the run length follow."""
    n = 1_281_167
    assert steps_per_epoch(n, 256) == math.ceil(math.ceil(n / 32) / 8) == 5005
    assert steps_per_epoch(3, 16) == 1 and steps_per_epoch(32, 16) == 2
    t = _trainer(tmp_path, photos, "max_steps=0", "epochs=3", "optim.lr_milestones=[2]")
    images, batch = len(t.dataset), t.cfg.data.global_batch
    assert images % batch  # the fixture has a short last batch
    assert t.spe == math.ceil(images / batch) and t.total_steps == 3 * t.spe
    assert t.sched_g.lr_lambdas[0](2 * t.spe - 1) == 1.0 and t.sched_g.lr_lambdas[0](2 * t.spe) == pytest.approx(0.1)


def test_lecam_emas_move_once_per_optimizer_step(tmp_path, photos):
    """With 2 micro-batches the LeCAM EMAs take one update per optimizer step (the official one per step),
    from the mean logits of the whole batch."""
    t = _trainer(tmp_path, photos, "data.micro_batch=2")
    assert t.accum == 2
    stats = t.train_step(t._micro_batches(iter(t.loader)), log=False)
    w = 1 - t.cfg.loss.lecam_decay  # from 0, one update: (1 - decay) * mean
    assert t.lecam.ema_real.item() == pytest.approx(w * stats["d/logits_real"].item(), rel=1e-5)
    assert t.lecam.ema_fake.item() == pytest.approx(w * stats["d/logits_fake"].item(), rel=1e-5)


def _bn_counts(t):
    return [int(m.num_batches_tracked) for m in t.disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def _g_loss_without_gan(s, L):
    return (L.pixel_weight * s["g/l1"] + L.perceptual_weight * s["g/lpips"] + L.entropy_weight * s["g/entropy"]
            + L.commitment_weight * s["g/commit"]).item()


def test_disc_start_official_bookkeeping(tmp_path, photos):
    """disc_start 2, official: before it D still runs (BatchNorm statistics, LeCAM EMAs) and its Adam steps
    with zero gradients; its loss is on from step 1 (the official D call sees global_step + 1), the
    generator's GAN term from step 2."""
    t = _trainer(tmp_path, photos, "loss.disc_start=2")
    L, it = t.cfg.loss, iter(t.loader)
    assert L.disc_start_bookkeeping == "official"
    weights0 = {n: p.detach().clone() for n, p in t.disc.named_parameters()}
    first = next(t.disc.parameters())

    s0 = t.train_step(t._micro_batches(it), log=False)
    t.step += 1
    assert _bn_counts(t) == [3 * t.accum] * 2  # D on the fakes in the G step, then on real and fake
    assert t.lecam.ema_real != 0 and t.lecam.ema_fake != 0
    assert s0["d/loss"] == 0 and s0["d/hinge"] > 0 and s0["d/grad_norm"] == 0
    assert t.opt_d.state[first]["step"] == 1  # a zero-gradient Adam step: the weights stay, the count grows
    assert all(torch.equal(p, weights0[n]) for n, p in t.disc.named_parameters())
    assert s0["g/gan"] > 0 and s0["g/loss"].item() == pytest.approx(_g_loss_without_gan(s0, L), rel=1e-6)

    s1 = t.train_step(t._micro_batches(it), log=False)
    t.step += 1
    assert s1["d/loss"] > 0 and t.opt_d.state[first]["step"] == 2
    # the moments were still zero: exp_avg = (1 - beta1) g and exp_avg_sq = (1 - beta2) g^2 now, and the update
    # uses the bias corrections of step 2
    st, (b1, b2) = t.opt_d.state[first], t.cfg.optim.betas
    nz = st["exp_avg_sq"] > 0
    assert nz.any() and torch.allclose(st["exp_avg"][nz] ** 2 / st["exp_avg_sq"][nz],
                                       torch.tensor((1 - b1) ** 2 / (1 - b2)), rtol=1e-4)
    assert not torch.equal(first, weights0["main.0.weight"])
    assert s1["g/loss"].item() == pytest.approx(_g_loss_without_gan(s1, L), rel=1e-6)

    s2 = t.train_step(t._micro_batches(it), log=False)
    assert s2["g/loss"].item() == pytest.approx(_g_loss_without_gan(s2, L) + L.gan_weight * s2["g/gan"].item(), rel=1e-6)


def test_disc_start_skip_bookkeeping_leaves_d_alone(tmp_path, photos):
    t = _trainer(tmp_path, photos, "loss.disc_start=2", "loss.disc_start_bookkeeping=skip")
    it = iter(t.loader)
    for step in range(2):
        s = t.train_step(t._micro_batches(it), log=False)
        t.step += 1
        assert "d/loss" not in s and s["g/gan"] == 0
        assert _bn_counts(t) == [0, 0] and not t.opt_d.state and t.lecam.ema_real == 0
    s = t.train_step(t._micro_batches(it), log=False)
    assert s["d/loss"] > 0 and s["g/gan"] > 0 and _bn_counts(t) == [3 * t.accum] * 2
    with pytest.raises(ConfigError, match="disc_start_bookkeeping"):
        _trainer(tmp_path / "bad", photos, "loss.disc_start_bookkeeping=later")
