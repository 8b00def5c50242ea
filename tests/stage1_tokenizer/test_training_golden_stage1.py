"""Fidelity of the Stage-1 training step: 3 steps of our trainer beside 3 steps of the official code.

The official initial checkpoint goes through our converter into our real trainer; the loss terms, LeCAM EMAs,
gradient norms per group and per tensor, the final weights, EMA and discriminator state must match the records of
``tests/data/official/golden/train`` (README there) within their tolerances. How the records are read and checked:
tests/support/golden_training.py; the other stage: tests/stage2_ar/test_training_golden_stage2.py.
"""
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from shared.checkpoint import load_strict
from shared.device import init_distributed
from shared.legacy_checkpoint import load_state_dict as load_official
from stage1_tokenizer.convert_official import convert_tokenizer_state, ema_name, infer_config, official_key_map
from stage1_tokenizer.train import Trainer
from stage1_tokenizer.train_config import DataConfig, DiscConfig, LossConfig, OptimConfig, TrainConfig
from support.golden_training import DTYPES, GOLD, Checker, dn  # noqa: F401 (dn: the fixture of the two runs)
from support.golden_training import golden_json as _json


S1_META, S1_TOL = _json("stage1_meta.json"), _json("stage1_tolerances.json")
VGG16_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512),
               (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
VGG16_FEATURE_INDEX = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
G_TERMS = {  # official log entry -> our value from the step's statistics
    "total_loss": lambda s, L: s["g/loss"],
    "reconstruct_loss": lambda s, L: s["g/l1"],
    "perceptual_loss": lambda s, L: s["g/lpips"],
    "nll_loss": lambda s, L: L.pixel_weight * s["g/l1"] + L.perceptual_weight * s["g/lpips"],
    "g_loss": lambda s, L: L.gan_weight * s["g/gan"],  # logged with its weight: d_weight * disc_factor * g_loss
    "entropy_loss": lambda s, L: s["g/entropy"],
    "per_sample_entropy": lambda s, L: s["g/sample_entropy"],
    "codebook_entropy": lambda s, L: s["g/codebook_entropy"],
    "commit_loss": lambda s, L: s["g/commit"],
}
D_TERMS = {"disc_loss": "d/loss", "non_saturated_d_loss": "d/hinge", "lecam_loss": "d/lecam",
           "logits_real": "d/logits_real", "logits_fake": "d/logits_fake"}
ENTROPY_TERMS = {"total_loss", "entropy_loss", "per_sample_entropy", "codebook_entropy"}
DISC_PREFIX = "loss.discriminator."


def seeded_vgg_trunk(path: Path) -> Path:
    """The random LPIPS trunk of the records: seed 0, the 13 VGG16 convs with PyTorch's default init, in order,
    saved as a torchvision ``vgg16`` file (the format our trainer reads); its sha256 is checked."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        convs = [torch.nn.Conv2d(ci, co, 3, padding=1) for ci, co in VGG16_CONVS]
    sd = {f"features.{i}.{w}": getattr(c, w).detach().clone()
          for i, c in zip(VGG16_FEATURE_INDEX, convs) for w in ("weight", "bias")}
    sha = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in sd.items()}
    assert sha == S1_META["lpips_trunk_sha256"], "the regenerated LPIPS trunk is not the recorded one"
    torch.save(sd, path)
    return path


def stage1_trainer(tmp_path: Path) -> Trainer:
    """Our trainer configured as the recorded run, holding the official initial weights (via our converter)."""
    sd = load_official(GOLD / "stage1_init.ckpt")
    dd, lc = S1_META["ddconfig"], S1_META["lossconfig"]
    model = replace(infer_config(sd, weights="raw"), resolution=dd["resolution"])
    assert (model.ch, list(model.ch_mult), model.num_res_blocks, model.z_channels) == (
        dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"])
    assert 2 ** model.bits == S1_META["n_embed"] and model.z_channels == S1_META["embed_dim"]
    images = tmp_path / "images"  # the trainer wants a dataset; the steps below are fed the recorded batches
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    lr, betas = S1_META["lr"], tuple(S1_META["betas"])
    cfg = TrainConfig(
        model=model, out_dir=str(tmp_path / "run"), device="cpu", precision="fp32", tensorboard=False,
        loss=LossConfig(lpips_weights=str(seeded_vgg_trunk(tmp_path / "vgg16.pth")), gan_weight=lc["gen_loss_weight"],
                        entropy_weight=lc["codebook_weight"], commitment_weight=lc["commit_weight"],
                        lecam_weight=lc["lecam_loss_weight"], disc_start=lc["disc_start"]),
        disc=DiscConfig(ndf=lc["disc_ndf"], n_layers=3),
        optim=OptimConfig(lr=lr, disc_lr=lr, betas=betas, lr_milestones=()),
        data=DataConfig(root=str(images), resolution=dd["resolution"], global_batch=2, micro_batch=2, num_workers=0),
    )
    trainer = Trainer(cfg, init_distributed("cpu"))
    load_strict(trainer.tok, convert_tokenizer_state(sd, weights="raw", cfg=model), "raw weights")
    load_strict(trainer.ema.model, convert_tokenizer_state(sd, weights="ema", cfg=model), "EMA weights")
    load_strict(trainer.disc, {k[len(DISC_PREFIX):]: v for k, v in sd.items() if k.startswith(DISC_PREFIX)},
                "discriminator")
    assert trainer.ema.decay == sd["model_ema.decay"].item()  # the float32 0.999 of the official LitEma
    heads = load_file(GOLD / "stage1_lpips_heads.safetensors")
    lp = trainer.lpips.lpips.state_dict()
    for k, v in heads.items():
        assert torch.equal(lp[k], v), f"LPIPS {k} differs from the recorded heads"
    return trainer


def _official_names(trainer: Trainer):
    """id(parameter) -> official parameter name, for the generator and the discriminator."""
    ours_to_official = official_key_map(trainer.tok.cfg)
    names = {id(p): ours_to_official[n] for n, p in trainer.tok.named_parameters()}
    names.update({id(p): DISC_PREFIX + n for n, p in trainer.disc.named_parameters()})
    return names


def _record_grads(trainer: Trainer):
    """The gradients each optimizer steps with (what the official records hold), by official name."""
    names, grads = _official_names(trainer), []
    for opt in (trainer.opt_g, trainer.opt_d):
        opt.register_step_pre_hook(lambda o, args, kwargs: grads.append(
            {names[id(p)]: p.grad.detach().double().clone() for g in o.param_groups for p in g["params"]
             if p.grad is not None}))
    return grads


def _stage1_step_tolerances(tol, dn: str, k: int):
    """(loss terms, entropy terms, LeCAM EMAs, group grad norms, tensor grad norms) relative tolerances of step k."""
    if dn == "fp64":
        t = tol["loss_terms_rel"]
        return t, t, tol["lecam_ema_rel"], tol["gradnorm_group_rel"], tol["gradnorm_tensor_rel"]
    if k == 0:
        t, g = tol["step0_loss_terms_rel"], tol["step0_gradnorm_rel"]
        return t, tol["step0_entropy_terms_rel"], t, g, g
    return (5e-2,) * 5  # float32 trajectories part after step 0: the tolerances file's "later_steps"


def _state_by_official_name(trainer: Trainer):
    """Our generator, EMA and discriminator tensors under the official state_dict names."""
    out, raw, ema = {}, trainer.tok.state_dict(), trainer.ema.model.state_dict()
    for ours, official in official_key_map(trainer.tok.cfg).items():
        out[official] = raw[ours]
        out[ema_name(official)] = ema[ours]
    out.update({DISC_PREFIX + k: v for k, v in trainer.disc.state_dict().items()})
    return {k: v.detach().clone() for k, v in out.items()}


def test_stage1_three_steps_match_the_official(tmp_path, dn):
    dtype = DTYPES[dn]
    trainer = stage1_trainer(tmp_path)
    for m in (trainer.tok, trainer.ema.model, trainer.disc, trainer.lpips, trainer.lecam):
        m.to(dtype)
    start = _state_by_official_name(trainer)
    grads = _record_grads(trainer)
    rec = Checker(load_file(GOLD / f"stage1_{dn}.records.safetensors"))
    tol = S1_TOL[dn]
    L = trainer.cfg.loss
    batches = load_file(GOLD / "stage1_inputs.safetensors")
    for k in range(3):
        gan_w, disc_w, _ = trainer._gan_switches()
        stats = trainer.train_step([batches[f"x{k}"].to(dtype)], log=False)
        trainer.step += 1  # what the fit loop does after each step
        t_loss, t_ent, t_lecam, t_gn, t_gt = _stage1_step_tolerances(tol, dn, k)
        p = f"step{k}."
        rec.phase = "" if dn == "fp64" else (" (step 0)" if k == 0 else " (steps 1-2)")
        for name, ours in G_TERMS.items():
            rec.rel(p + "G." + name, ours(stats, L), t_ent if name in ENTROPY_TERMS else t_loss, "loss terms")
        rec.rel(p + "G.d_weight", L.gan_weight, t_loss, "loss terms")
        rec.rel(p + "G.disc_factor", gan_w / L.gan_weight, 0.0, "loss terms")
        for name, ours in D_TERMS.items():
            rec.rel(p + "D." + name, stats[ours], t_loss, "loss terms")
        rec.rel(p + "D.disc_factor", disc_w / L.disc_weight, 0.0, "loss terms")
        rec.rel(p + "lecam_ema_real", trainer.lecam.ema_real, t_lecam, "lecam ema")
        rec.rel(p + "lecam_ema_fake", trainer.lecam.ema_fake, t_lecam, "lecam ema")
        g_gen, g_disc = grads[2 * k], grads[2 * k + 1]
        group_norm = lambda gs: torch.stack([g.norm() for g in gs.values()]).norm()
        for group, gs in (("encoder", {n: g for n, g in g_gen.items() if n.startswith("encoder.")}),
                          ("decoder", {n: g for n, g in g_gen.items() if n.startswith("decoder.")}),
                          ("generator", g_gen), ("discriminator", g_disc)):
            rec.rel(p + "gradnorm." + group, group_norm(gs), t_gn, "grad norm groups")
        assert stats["g/grad_norm"].item() == pytest.approx(group_norm(g_gen).item(), rel=1e-6)
        assert stats["d/grad_norm"].item() == pytest.approx(group_norm(g_disc).item(), rel=1e-6)
        # A gradient that is zero in exact arithmetic holds rounding noise in both runs, which no relative
        # tolerance can compare: such a tensor must be below the noise bound on both sides. The only one is the
        # shift of the full-resolution AdaGN (32 channels in 32 groups: every GroupNorm after it removes a
        # per-channel constant).
        noise = 100 * torch.finfo(dtype).eps * group_norm(g_gen).item()
        for n, g in {**g_gen, **g_disc}.items():
            key = p + "gradnorm_tensor." + n
            if rec.records[key].item() < noise:
                assert n.startswith("decoder.adaptive.0.beta."), f"{key}: unexpected zero gradient"
                rec.abs(key, g.norm(), torch.zeros(()), noise, "zero grad tensors (abs)")
            else:
                rec.rel(key, g.norm(), t_gt, "grad norm tensors")

    rec.phase = ""
    end = _state_by_official_name(trainer)
    init = load_official(GOLD / "stage1_init.ckpt")
    if dn == "fp64":
        _check_final_fp64(rec, trainer, init, tol)
    else:
        for key in [k for k in rec.records if k.startswith("final_delta_norm.")]:
            name = key[len("final_delta_norm."):]
            if name not in end:
                rec.excuse(key)
                rec.excuse("final_delta_absmax." + name)
                assert name.startswith("model_ema.lossdiscriminator") or name == "model_ema.decay", name
                continue
            delta = end[name].double() - start[name].double()
            rec.rel(key, delta.norm(), tol["final_delta_norm_rel"], "final delta norms")
            rec.rel("final_delta_absmax." + name, delta.abs().max(), tol["final_delta_norm_rel"], "final delta norms")
    _check_int_buffers(rec, trainer)
    rec.all_checked()
    print(f"\nstage 1 {dn}: worst errors {json.dumps({k: float(f'{v:.3g}') for k, v in rec.worst.items()})}")


def _check_int_buffers(rec: Checker, trainer: Trainer):
    """BatchNorm step counters exactly; the LitEma update counter (-1: no warm-up) has no counterpart here."""
    for key in [k for k in rec.records if k.startswith("final.")]:
        name = key[len("final."):]
        if name == "model_ema.num_updates":
            assert rec.records[key].item() == -1  # constant decay, as our EMA
            rec.excuse(key)
            continue
        assert name.startswith(DISC_PREFIX), name
        rec.exact(key, trainer.disc.state_dict()[name[len(DISC_PREFIX):]])


def _check_final_fp64(rec: Checker, trainer: Trainer, init, tol):
    """Final weights = initial + recorded delta, through our converter, against the trainer's tensors."""
    expected = dict(init)
    for key in [k for k in rec.records if k.startswith("final_delta.")]:
        name = key[len("final_delta."):]
        expected[name] = init[name].double() + rec.records[key].double()
    cfg = trainer.tok.cfg
    raw = convert_tokenizer_state(expected, weights="raw", cfg=cfg)
    ema = convert_tokenizer_state(expected, weights="ema", cfg=cfg)
    ours_raw, ours_ema = trainer.tok.state_dict(), trainer.ema.model.state_dict()
    for ours, official in official_key_map(cfg).items():
        rec.abs("final_delta." + official, ours_raw[ours], raw[ours], tol["final_params_abs"], "final params")
        rec.abs("final_delta." + ema_name(official), ours_ema[ours], ema[ours], tol["final_ema_abs"], "final ema")
    for name, t in trainer.disc.state_dict().items():
        key = "final_delta." + DISC_PREFIX + name
        if t.is_floating_point():
            rec.abs(key, t, expected[DISC_PREFIX + name], tol["final_disc_abs"], "final discriminator")
    for key in [k for k in rec.records if k.startswith("final_delta.model_ema.")]:
        name = key[len("final_delta."):]
        if name == "model_ema.decay":  # a constant
            assert rec.records[key].item() == 0
            rec.excuse(key)
        elif name.startswith("model_ema.lossdiscriminator"):  # the official EMA also shadows D; ours does not
            rec.excuse(key)
