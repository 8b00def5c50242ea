"""Stage-1 training losses: PatchGAN layout, hinge / non-saturating GAN terms, LeCAM, frozen LPIPS, EMA."""
import logging

import pytest
import torch
import torch.nn.functional as F

from stage1_tokenizer import losses
from stage1_tokenizer.discriminator import PatchDiscriminator
from stage1_tokenizer.ema import EMA


def test_patch_discriminator_matches_official_layout():
    d = PatchDiscriminator()
    # reference §3: 2,765,633 parameters, keys main.{0,2,3,5,6,8,9,11}
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    assert sorted({int(k.split(".")[1]) for k in d.state_dict()}) == [0, 2, 3, 5, 6, 8, 9, 11]
    assert [type(m).__name__ for m in d.main] == ["Conv2d", "LeakyReLU"] + ["Conv2d", "BatchNorm2d", "LeakyReLU"] * 3 + ["Conv2d"]
    assert d.main[2].bias is None and d.main[0].bias is not None and d.main[11].bias is not None
    assert d.main[1].negative_slope == 0.2
    # 64 -> 32 -> 16 -> 8 (stride 2) -> 7 -> 6 (stride 1, kernel 4, padding 1)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    w = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(w.std().item() - 0.02) < 0.002


def test_hinge_and_non_saturating_losses_by_hand():
    real = torch.tensor([[[[2.0, 0.5], [-1.0, 0.0]]]])
    fake = torch.tensor([[[[-2.0, 0.5], [1.0, -0.5]]]])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))
    expect = 0.5 * ((0 + 0.5 + 2 + 1) / 4 + (0 + 1.5 + 2 + 0.5) / 4)
    assert losses.hinge_d_loss(real, fake).item() == pytest.approx(expect)
    # per-image mean logit, then -log sigmoid
    logits = torch.tensor([[[[1.0, 3.0]]], [[[-2.0, 0.0]]]])
    m = torch.tensor([2.0, -1.0])
    assert losses.non_saturating_g_loss(logits).item() == pytest.approx(-F.logsigmoid(m).mean().item())


def test_lecam_updates_emas_before_the_term():
    lecam = losses.LeCAM(decay=0.9)
    real = torch.tensor([1.0, 3.0])
    fake = torch.tensor([-1.0, -3.0])
    lecam.update(real.mean(), fake.mean())
    assert lecam.ema_real.item() == pytest.approx(0.1 * 2.0) and lecam.ema_fake.item() == pytest.approx(0.1 * -2.0)
    reg = lecam(real, fake)
    er, ef = 0.2, -0.2
    expect = torch.relu(real - ef).pow(2).mean() + torch.relu(er - fake).pow(2).mean()
    assert reg.item() == pytest.approx(expect.item())
    lecam.update(torch.tensor(0.0), torch.tensor(0.0))
    assert lecam.ema_real.item() == pytest.approx(0.9 * 0.2)
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}


def test_lpips_missing_trunk_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(losses.LPIPSWeightsMissing, match="vgg16-397923af.pth"):
        losses.FrozenLPIPS("vgg")
    with pytest.raises(losses.LPIPSWeightsMissing, match="not found at"):
        losses.FrozenLPIPS("vgg", weights=tmp_path / "missing.pth", allow_random_trunk=True)


def test_lpips_random_trunk_only_when_allowed_and_loud(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    caplog.set_level(logging.WARNING)
    losses.log.propagate = True  # let caplog see the module logger
    try:
        net = losses.FrozenLPIPS("vgg", allow_random_trunk=True)
    finally:
        losses.log.propagate = False
    assert net.random_trunk and "RANDOM trunk" in caplog.text
    assert not any(p.requires_grad for p in net.parameters())  # trunk AND linear heads frozen
    net.train()
    assert not net.training and not net.lpips.training
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    y = torch.rand(2, 3, 32, 32)
    d = net(x * 2 - 1, y * 2 - 1)
    assert d.shape == (2,) and (d > 0).all()
    assert net(y, y).abs().max() == 0
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # linear heads are the package's calibrated weights, not random
    import lpips as lp
    from pathlib import Path
    heads = torch.load(Path(lp.__file__).parent / "weights/v0.1/vgg.pth", map_location="cpu", weights_only=True)
    assert net.lpips.lin0.model[1].weight.equal(heads["lin0.model.1.weight"])


def test_lpips_loads_a_torchvision_trunk_file(tmp_path, monkeypatch):
    """A torchvision-format VGG16 file (random values here) lands in LPIPS's slices, from a path or TORCH_HOME."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(1)
    features = make_layers(cfgs["D"])
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    ckpt_dir = tmp_path / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.save(sd, ckpt_dir / "vgg16-397923af.pth")
    net = losses.FrozenLPIPS("vgg", weights=ckpt_dir / "vgg16-397923af.pth")
    assert not net.random_trunk
    assert net.lpips.net.slice1[0].weight.equal(sd["features.0.weight"])
    assert getattr(net.lpips.net.slice5, "28").bias.equal(sd["features.28.bias"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net2 = losses.FrozenLPIPS("vgg")
    assert getattr(net2.lpips.net.slice3, "14").weight.equal(sd["features.14.weight"])


def test_ema_update_rule():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for k, v in ema.weights().items():
        assert torch.allclose(v, 0.9 * start[k] + 0.1 * (start[k] + 1.0), atol=1e-6)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_decay_is_the_official_float32_value():
    """The official LitEma keeps 0.999 in a float32 buffer: each update closes 9.9998713e-4 of the gap, not 1e-3."""
    model = torch.nn.Linear(3, 2).double()
    ema = EMA(model, decay=0.999)
    assert ema.decay == float(torch.tensor(0.999, dtype=torch.float32)) == 0.9990000128746033
    start = {k: v.clone() for k, v in ema.weights().items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(start[name] + 1.0)
    ema.update(model)
    for k, v in ema.weights().items():
        assert torch.equal(v - start[k], torch.full_like(v, 1 - 0.9990000128746033))  # 9.999871253967285e-4


def test_discriminator_init_is_the_official_one():
    """Official: the layers are built with PyTorch's default init, then ``weights_init`` redraws conv weights
    N(0, 0.02) and BatchNorm scales N(1, 0.02) (shifts 0) in module order; conv biases keep their default draw."""
    torch.manual_seed(3)
    d = PatchDiscriminator(3, 16, 3)
    torch.manual_seed(3)
    layers = [torch.nn.Conv2d(3, 16, 4, 2, 1), torch.nn.LeakyReLU(0.2),
              torch.nn.Conv2d(16, 32, 4, 2, 1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.LeakyReLU(0.2),
              torch.nn.Conv2d(32, 64, 4, 2, 1, bias=False), torch.nn.BatchNorm2d(64), torch.nn.LeakyReLU(0.2),
              torch.nn.Conv2d(64, 128, 4, 1, 1, bias=False), torch.nn.BatchNorm2d(128), torch.nn.LeakyReLU(0.2),
              torch.nn.Conv2d(128, 1, 4, 1, 1)]
    for m in layers:
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight, 1.0, 0.02)
            torch.nn.init.zeros_(m.bias)
    official = torch.nn.Sequential(*layers).state_dict()
    ours = d.main.state_dict()
    assert ours.keys() == official.keys()
    assert all(torch.equal(ours[k], official[k]) for k in ours)
    for conv in (d.main[0], d.main[11]):  # the two biased convs: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not zeros
        bound = 1 / (conv.in_channels * 16) ** 0.5
        assert conv.bias.abs().max() > 0 and conv.bias.abs().max() <= bound
