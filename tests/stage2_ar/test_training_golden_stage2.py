"""Fidelity of the Stage-2 training step: 3 steps of our trainer beside 3 steps of the official code.

The official initial checkpoint goes through our converter into our real trainer; the two cross-entropies, the
learning rate, clipped gradient norms per group and per tensor and the final weights must match the records of
``tests/data/official/golden/train`` (README there) within their tolerances. How the records are read and checked:
tests/support/golden_training.py; the other stage: tests/stage1_tokenizer/test_training_golden_stage1.py.
"""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.checkpoint import load_strict
from shared.device import init_distributed
from shared.legacy_checkpoint import load_state_dict as load_official
from stage2_ar import convert_official as ar_convert
from stage2_ar.model import FactorizedAR, subtoken_loss
from stage2_ar.train import TrainStep, lr_schedule
from stage2_ar.train_config import DataConfig as ARData
from stage2_ar.train_config import OptimConfig as AROptim
from stage2_ar.train_config import ScheduleConfig
from stage2_ar.train_config import TrainConfig as ARTrain
from support.golden_training import DTYPES, GOLD, Checker, dn  # noqa: F401 (dn: the fixture of the two runs)
from support.golden_training import golden_json as _json


S2_META, S2_TOL = _json("stage2_meta.json"), _json("stage2_tolerances.json")
S2_GROUPS = ("pre_emb", "post_emb", "class_emb", "spatial_blocks", "factorized_blocks", "norm", "head")


def stage2_step(tmp_path: Path):
    """Our AR training step (the trainer's ``TrainStep``) configured as the recorded run, holding the official
    initial weights (via our converter)."""
    sd = load_official(GOLD / "stage2_init.ckpt")
    tc, m = S2_META["transformer_config"], S2_META
    side = int(tc["block_size"] ** 0.5)
    model_cfg = replace(ar_convert.infer_config(sd, head_dim=tc["dim"] // tc["n_head"], grid=(side, side)),
                        class_dropout=0.1, embed_dropout=tc["token_drop"], resid_dropout=tc["resid_dropout_p"])
    assert tc["ffn_dropout_p"] == tc["resid_dropout_p"]  # ours has one dropout rate for both
    assert (model_cfg.n_inter, model_cfg.n_intra, tuple(model_cfg.bits)) == (
        tc["spatial_n_layer"], tc["factorized_n_layer"], tuple(tc["factorized_bits"]))
    model = FactorizedAR(model_cfg)
    load_strict(model, ar_convert.convert_ar_state(sd, model_cfg), "official AR weights")
    batch = len(load_file(GOLD / "stage2_inputs.safetensors")["step0.labels"])
    assert m["wpe"] == 0.1 and m["twde"] == m["weight_decay"]  # constant weight decay on every parameter
    cfg = ARTrain(
        model=model_cfg, out_dir=str(tmp_path / "run"), device="cpu", precision="fp32",
        optim=AROptim(lr=m["learning_rate"], weight_decay=m["weight_decay"], decay="all",
                      grad_clip=m["gradient_clip_val"]),
        schedule=ScheduleConfig(epochs=m["max_epochs"], warmup_epochs=m["wp"], start_ratio=m["wp0"],
                                end_ratio=m["wpe"]),
        data=ARData(global_batch=batch, micro_batch=batch),
    )
    # the official run counts iters_train = 1 step per epoch: one epoch of `batch` images
    assert m["iters_train"] == 1
    return TrainStep(model.train(), cfg, init_distributed("cpu"), lr_schedule(cfg.schedule, steps_per_epoch=1))


def test_stage2_three_steps_match_the_official(tmp_path, dn):
    step = stage2_step(tmp_path)
    model = step.model.to(DTYPES[dn])
    names = ar_convert.official_key_map(model.cfg)
    start = {n: t.detach().clone() for n, t in model.state_dict().items()}
    seen, grads = {}, []
    model.register_forward_hook(lambda mod, args, out: seen.update(logits=out, subs=args[0]))
    model.class_emb.register_forward_hook(lambda mod, args, out: seen.update(labels=args[0].clone()))
    by_id = {id(p): names[n] for n, p in model.named_parameters()}
    step.opt.register_step_pre_hook(lambda o, args, kwargs: grads.append(
        {by_id[id(p)]: p.grad.detach().double().clone() for g in o.param_groups for p in g["params"]}))
    rec, tol = Checker(load_file(GOLD / f"stage2_{dn}.records.safetensors")), S2_TOL[dn]
    inputs = load_file(GOLD / "stage2_inputs.safetensors")
    for k in range(3):
        p = f"step{k}."
        subs = (inputs[p + "pre"], inputs[p + "post"])
        torch.manual_seed(S2_META["rng_seeds"][k])  # the class dropout's draw is the forward's first, as official
        stats = step(iter([(subs, inputs[p + "labels"])]))
        assert torch.equal(seen["labels"], inputs[p + "labels_after_drop"])
        drop = inputs[p + "class_drop_uniforms"] < model.cfg.class_dropout
        assert torch.equal(inputs[p + "labels_after_drop"], torch.where(drop, model.null_class, inputs[p + "labels"]))
        pre, post = (subtoken_loss([lg], [st]) for lg, st in zip(seen["logits"], seen["subs"]))
        loss_tol = tol["loss_rel"]
        rec.rel(p + "loss", subtoken_loss(seen["logits"], seen["subs"]), loss_tol, "loss")
        rec.rel(p + "loss_pre", pre, loss_tol, "loss")
        rec.rel(p + "loss_post", post, loss_tol, "loss")
        assert stats["loss"].item() == pytest.approx(rec.records[p + "loss"].item(), rel=max(loss_tol, 1e-6))
        rec.rel(p + "grad_norm_before_clip", stats["grad_norm"], tol.get("grad_norm_before_clip_rel",
                                                                         tol.get("grad_norm_rel")), "grad norm")
        rec.rel(p + "lr", stats["lr"], tol.get("lr_rel", 1e-12), "lr")
        assert len(step.opt.param_groups) == 1  # decay "all": one group, every parameter decayed
        rec.rel(p + "weight_decay", step.opt.param_groups[0]["weight_decay"], tol.get("weight_decay_rel", 1e-12), "lr")
        g = grads[k]
        for group in S2_GROUPS:
            norm = torch.stack([t.norm() for n, t in g.items() if n.startswith(group + ".")]).norm()
            rec.rel(p + "gradnorm_clipped." + group, norm, tol["gradnorm_group_rel"], "grad norm groups")
        for n, t in g.items():
            rec.rel(p + "gradnorm_tensor_clipped." + n, t.norm(), tol["gradnorm_tensor_rel"], "grad norm tensors")

    init = load_official(GOLD / "stage2_init.ckpt")
    end = model.state_dict()
    for ours, official in names.items():
        key = ar_convert.AR_PREFIX + official
        if dn == "fp64":
            expected = init[key].double() + rec.records["final_delta." + key].double()
            rec.abs("final_delta." + key, end[ours], expected, tol["final_params_abs"], "final params")
        else:
            delta = end[ours].double() - start[ours].double()
            rec.rel("final_delta_norm." + key, delta.norm(), tol["final_delta_norm_rel"], "final delta norms")
            rec.rel("final_delta_absmax." + key, delta.abs().max(), tol["final_delta_norm_rel"], "final delta norms")
    rec.all_checked()
    print(f"\nstage 2 {dn}: worst errors {json.dumps({k: float(f'{v:.3g}') for k, v in rec.worst.items()})}")
