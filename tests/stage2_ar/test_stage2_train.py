"""Stage-2 trainer: LR schedule, decay groups, accumulation, exact resume, world-size-independent batches."""
import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.checkpoint import load_trainer_state
from shared.run_checkpoints import step_dirs
from shared.config import ConfigError, resolve
from shared.rng import seed_everything
from shared.runlog import read_metrics
from stage2_ar.config import PRESETS as MODEL_PRESETS
from stage2_ar.lr_schedule import WarmupHoldDecay, build_scheduler, load_scheduler_state
from stage2_ar.model import FactorizedAR
from shared.training_run import steps_per_epoch as steps_in_epoch
from stage2_ar.train import accumulation_steps, param_groups
from stage2_ar.train_config import PRESETS, TrainConfig
from support.free_port import free_port

REPO = Path(__file__).resolve().parents[2]
LN_VOCAB = math.log(64) + math.log(4096)  # 12.4766: loss of the zero-initialised heads


pytestmark = pytest.mark.usefixtures("one_thread")


def test_lr_schedule_shape():
    s = WarmupHoldDecay(total_steps=1000, warmup_steps=100)
    assert s(0) == pytest.approx(0.005)
    assert s(50) == pytest.approx(0.005 + 0.995 * 0.5)
    assert s(100) == pytest.approx(1.0)
    # hold for the first 5 % of the 899-step post-warm-up span (steps 100 .. 144)
    assert s(144) == 1.0 and s(145) < 1.0
    assert s(999) == pytest.approx(0.1)
    after = [s(i) for i in range(145, 1000)]
    assert all(a > b for a, b in zip(after, after[1:]))  # strictly decreasing
    mid = 100 + 0.05 * 899 + (899 - 0.05 * 899) / 2  # half-way through the decay: half-way from 1 to 0.1
    assert s(mid) == pytest.approx(0.55, abs=1e-9)
    with pytest.raises(ValueError):
        WarmupHoldDecay(total_steps=10, warmup_steps=11)


def test_scheduler_drives_optimizer_and_survives_weights_only_round_trip(tmp_path):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=2e-3)
    sched = build_scheduler(opt, WarmupHoldDecay(20, 4))
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:5] == pytest.approx([2e-3 * WarmupHoldDecay(20, 4)(i) for i in range(5)])
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    opt2 = torch.optim.AdamW([p], lr=2e-3)
    sched2 = build_scheduler(opt2, WarmupHoldDecay(20, 4))
    load_scheduler_state(sched2, torch.load(tmp_path / "s.pt", weights_only=True))
    assert opt2.param_groups[0]["lr"] == pytest.approx(2e-3 * WarmupHoldDecay(20, 4)(10))


def test_decay_groups():
    model = FactorizedAR(MODEL_PRESETS["ar-tiny"])
    params = dict(model.named_parameters())
    n_all = len(params)

    def names(groups, i):
        ids = {id(p) for p in groups[i]["params"]}
        return {n for n, p in params.items() if id(p) in ids}

    g = param_groups(model, "all", 0.05)  # the official run's effective behaviour
    assert len(g) == 1 and len(g[0]["params"]) == n_all and g[0]["weight_decay"] == 0.05
    g = param_groups(model, "2d", 0.05)
    assert {n for n in names(g, 1)} == {n for n, p in params.items() if p.ndim == 1}
    assert all("norm" in n for n in names(g, 1)) and g[1]["weight_decay"] == 0.0
    assert any("emb" in n for n in names(g, 0))
    g = param_groups(model, "linear", 0.05)
    assert not any("emb" in n or "norm" in n for n in names(g, 0))
    assert any("emb" in n for n in names(g, 1))
    with pytest.raises(ConfigError):
        param_groups(model, "some", 0.05)


def test_accumulation_keeps_global_batch():
    assert accumulation_steps(768, 24, 32) == 1
    assert accumulation_steps(768, 24, 8) == 4
    assert accumulation_steps(768, 12, 1) == 64
    with pytest.raises(ConfigError, match="not a multiple"):
        accumulation_steps(768, 24, 5)


def test_presets_resolve():
    for name in ("ar-B", "ar-L", "ar-XL", "ar-tiny", "ar-demo"):
        cfg = resolve(TrainConfig, PRESETS, name)
        assert cfg.model == MODEL_PRESETS[name]
    assert PRESETS["ar-XL"].optim.lr == 2.4e-4 and PRESETS["ar-XL"].schedule.warmup_epochs == 7
    for name, nodes in (("ar-B", 4), ("ar-L", 8), ("ar-XL", 12)):
        c = PRESETS[name]
        assert c.data.global_batch == 768 and 768 % (c.data.micro_batch * 8 * nodes) == 0


IMAGENET_TRAIN = 1_281_167


def test_recipe_steps_equal_the_official_count():
    """The official trainer runs ceil(ceil(N / ranks) / per-device batch) steps an epoch (Lightning's
    DistributedSampler pads to equal shares; the DataLoader keeps the short last batch) on 4, 8, 12 nodes
    of 8 devices; the schedule here counts ceil(N / global batch): the same 1669 on ImageNet."""
    totals = {}
    for name, nodes in (("ar-B", 4), ("ar-L", 8), ("ar-XL", 12)):
        c = PRESETS[name]
        official = -(-(-(-IMAGENET_TRAIN // (8 * nodes))) // c.data.micro_batch)
        assert steps_in_epoch(IMAGENET_TRAIN, c.data.global_batch) == official == 1669
        totals[name] = (round(c.schedule.epochs * 1669), round(c.schedule.warmup_epochs * 1669))
    assert totals == {"ar-B": (500_700, 10_014), "ar-L": (500_700, 10_014), "ar-XL": (584_150, 11_683)}  # docs


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_an_epoch_is_one_pass_over_the_images_whatever_the_views(tmp_path, token_dataset):
    """40 images with 2 stored views, global batch 16: 2 epochs are 2 x ceil(40 / 16) = 6 steps (counting
    (image, view) rows would make them 10)."""
    ds = token_dataset(40, views=("center", "flip"))  # random grids, 10 classes
    out = tmp_path / "run"
    _train_here([f"data.path={ds}", f"out_dir={out}", "data.clean_stale_shm=false",
                 "schedule.max_steps=0", "schedule.epochs=2", "schedule.warmup_epochs=1", "ckpt_every=100"])
    assert [p.name for p in step_dirs(out)] == ["step-00000006"]
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "epoch" in r]
    assert rows[-1]["step"] == 6 and rows[-1]["epoch"] == pytest.approx(6 * 16 / 40)


@pytest.fixture
def shards(token_dataset):
    """128 images of a 4x4 grid whose tokens depend on the class (learnable), 10 classes; 20% of the tokens
    redrawn at random, the first 32 images again as "val", 4 KiB shards (conftest's token_dataset)."""
    return token_dataset(128, tokens="by-class", noise=0.2, val=32, shard_bytes=1 << 12)


def _cli(args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})})
    return subprocess.Popen([sys.executable, "-m", "stage2_ar.train", "--config", "ar-tiny", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train_here(args):
    """Train in this process (saves a Python start-up: streaming's import alone takes seconds here)."""
    from stage2_ar.train import train

    return train(resolve(TrainConfig, PRESETS, "ar-tiny", args))


def _two_ranks(args):
    """The CLI as 2 DDP ranks (gloo), started in the background: wait for them with ``_wait``."""
    port = free_port()
    return [_cli(args, {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in range(2)]


def _wait(procs, timeout=240):
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-4000:]
        outs.append(out)
    return outs


def _common(shards, out):
    # dropout on (RNG restore matters), 2 workers (loader state matters), 2 micro-batches per step, and
    # 12 steps x 16 images over 128 images: the run crosses an epoch boundary after the resume point.
    return [f"data.path={shards}", f"out_dir={out}", "data.clean_stale_shm=false", "data.num_workers=2",
            "schedule.max_steps=12", "schedule.warmup_steps=3", "ckpt_every=100", "log_every=1"]


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(shards, tmp_path):
    _train_here(_common(shards, tmp_path / "full"))
    _train_here(_common(shards, tmp_path / "part") + ["stop_after=5"])
    assert [p.name for p in step_dirs(tmp_path / "part")] == ["step-00000005"]
    state = load_trainer_state(tmp_path / "part" / "step-00000005")
    assert state["step"] == 5 and state["world_size"] == 1 and state["ranks"][0]["data"]["sample_in_epoch"] == 5 * 16
    assert set(state) >= {"optimizer", "scheduler", "ranks"} and set(state["ranks"][0]) == {"rng", "data"}
    _wait([_cli(_common(shards, tmp_path / "part"))])  # a new process; resume=auto picks up step 5

    a = load_file(str(tmp_path / "full" / "step-00000012" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "step-00000012" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")}
    lb = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")}
    assert sorted(lb) == list(range(1, 13)) and la == lb
    # the resumed model loads with the model's own loader (kind "ar", strict)
    FactorizedAR.from_checkpoint(tmp_path / "part" / "step-00000012")


@pytest.mark.slow
def test_loss_drops_and_samples_are_written(shards, tmp_path):
    out = tmp_path / "run"
    args = [f"data.path={shards}", f"out_dir={out}", "data.clean_stale_shm=false", "schedule.max_steps=40",
            "schedule.warmup_steps=4", "optim.lr=3e-3", "log_every=5", "sample_every=40", "sample_per_class=2",
            "data.val_split=val", "eval_every=20", "eval_batches=2", "ckpt_every=20", "keep_last=1"]
    _train_here(args)
    rows = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert losses[0] > LN_VOCAB - 0.5 and losses[-1] < LN_VOCAB - 3, losses
    assert len(vals) == 2 and vals[-1] < LN_VOCAB - 3
    assert [p.name for p in step_dirs(out)] == ["step-00000040"]  # keep_last=1 pruned step 20
    pngs = list((out / "images").glob("samples-*.png"))
    assert len(pngs) == 1
    from PIL import Image

    w, h = Image.open(pngs[0]).size
    assert w > 2 * 32 and h > 8 * 32  # 2 per class in a row, 8 classes, 4x4 tokens drawn at 8 px


@pytest.mark.slow
def test_global_batch_is_independent_of_world_size(shards, tmp_path):
    """1 device x 4 micro-batches and 2 DDP devices x 2 micro-batches make the same optimiser steps.

    Equal up to summation order: Adam can amplify that to ~1e-5 on a near-zero gradient entry.
    """
    common = [f"data.path={shards}", "data.clean_stale_shm=false", "schedule.max_steps=3", "schedule.warmup_steps=1",
              "data.micro_batch=4", "data.num_canonical_nodes=2", "ckpt_every=100", "model.class_dropout=0.0",
              "model.embed_dropout=0.0", "model.resid_dropout=0.0", "optim.lr=3e-3"]
    procs = _two_ranks(common + [f"out_dir={tmp_path / 'two'}"])
    _train_here(common + [f"out_dir={tmp_path / 'one'}"])
    _wait(procs)
    a = load_file(str(tmp_path / "one" / "step-00000003" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "step-00000003" / "model.safetensors"))
    seed_everything(0)  # the trainer's initial weights (seed 0)
    init = FactorizedAR(MODEL_PRESETS["ar-tiny"]).state_dict()
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)  # one Adam step moves ~3e-3
        moved += not torch.equal(a[k], init[k])
    assert moved > len(a) // 2  # the comparison is not between two untouched models


def test_train_step_state_round_trip_continues_exactly():
    """The step the trainer and the ablations call: its optimiser + scheduler state and the weights, taken after
    2 of 4 steps and loaded into a fresh model and step, continue bit for bit (dropout on: same RNG state)."""
    from shared.device import DistInfo
    from stage2_ar.train import TrainStep, lr_schedule

    cfg = resolve(TrainConfig, PRESETS, "ar-tiny", ["data.global_batch=8", "data.micro_batch=4",
                                                    "schedule.max_steps=4", "schedule.warmup_steps=1"])
    info = DistInfo(0, 0, 1, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    data = [(tuple(torch.randint(0, v, (4, 16), generator=g) for v in cfg.model.vocab_sizes),
             torch.randint(0, 10, (4,), generator=g)) for _ in range(8)]

    def fresh():
        seed_everything(0)
        model = FactorizedAR(cfg.model)
        return model, TrainStep(model, cfg, info, lr_schedule(cfg.schedule, 1))

    model, step = fresh()
    assert step.accum == 2 and step.schedule.total_steps == 4
    batches = iter(data)
    losses = [float(step(batches)["loss"]) for _ in range(2)]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state, rng = copy.deepcopy(step.state_dict()), torch.get_rng_state()  # as written to disk
    losses += [float(step(batches)["loss"]) for _ in range(2)]

    model2, step2 = fresh()
    model2.load_state_dict(weights)
    step2.load_state_dict(state)
    torch.set_rng_state(rng)
    rest = iter(data[4:])
    assert [float(step2(rest)["loss"]) for _ in range(2)] == losses[2:]
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k


@pytest.mark.slow
def test_resume_on_another_world_size_keeps_the_data_order(shards, tmp_path):
    """A 1-device checkpoint resumed by 2 DDP ranks: the streaming position is global, so the remaining steps
    see the same images (dropout off: the weights match the uninterrupted run to summation order), and the
    RNG streams are re-seeded with a warning."""
    common = [f"data.path={shards}", "data.clean_stale_shm=false", "schedule.max_steps=4", "schedule.warmup_steps=1",
              "data.micro_batch=4", "data.num_canonical_nodes=2", "ckpt_every=100", "model.class_dropout=0.0",
              "model.embed_dropout=0.0", "model.resid_dropout=0.0", "optim.lr=3e-3"]
    _train_here(common + [f"out_dir={tmp_path / 'one'}"])
    _train_here(common + [f"out_dir={tmp_path / 'grown'}", "stop_after=2"])
    procs = _two_ranks(common + [f"out_dir={tmp_path / 'grown'}"])
    outs = _wait(procs)
    assert "resuming with 2 process(es) x micro_batch 4 from a run of 1 x 4" in outs[0]
    assert load_trainer_state(tmp_path / "grown" / "step-00000004")["world_size"] == 2
    a = load_file(str(tmp_path / "one" / "step-00000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "grown" / "step-00000004" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_cli_errors_are_one_line(shards, tmp_path):
    from stage2_ar.train import main

    with pytest.raises(SystemExit, match="^error: data.path is required"):
        main(["--config", "ar-tiny", f"out_dir={tmp_path / 'a'}"])
    with pytest.raises(SystemExit, match="^error: token shards do not match the model: token grid") as e:
        main(["--config", "ar-tiny", f"data.path={shards}", f"out_dir={tmp_path / 'b'}", "model.grid=[8,8]",
              "data.clean_stale_shm=false"])
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="not a multiple"):
        main(["--config", "ar-tiny", f"data.path={shards}", f"out_dir={tmp_path / 'c'}", "data.micro_batch=5",
              "data.clean_stale_shm=false"])
    with pytest.raises(SystemExit, match="optim.decay"):
        main(["--config", "ar-tiny", f"data.path={shards}", f"out_dir={tmp_path / 'd'}", "optim.decay=none",
              "data.clean_stale_shm=false"])
    with pytest.raises(SystemExit, match="unknown preset"):
        main(["--config", "ar-huge"])
