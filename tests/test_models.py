"""Tests for cellp2p.models: shapes, parameter counts, receptive fields, configs (tiny, CPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from cellp2p.errors import CellP2PError
from cellp2p.models import (
    ContractingBlock,
    Discriminator,
    ExpandingBlock,
    FeatureMapBlock,
    Generator,
    UNet,
    build_model,
    count_parameters,
    model_from_config,
    receptive_field,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Deterministic weights and inputs."""
    torch.manual_seed(0)


@pytest.mark.parametrize("size", [(32, 32), (37, 50), (23, 100), (5, 7)])
def test_unet_same_any_size(size: tuple[int, int]) -> None:
    """The same-padding U-Net returns logits of the input size for any H×W."""
    m = build_model("unet", "small", in_channels=2, out_channels=3, base=4, depth=3)
    assert m.divisor == 1
    assert m.output_size(size[0]) == size[0] and m.valid_input_size(size[1]) == size[1]
    y = m(torch.randn(2, 2, *size))
    assert y.shape == (2, 3, *size)
    assert torch.isfinite(y).all()


def test_unet_same_course_layout_and_options() -> None:
    """Layout/norm/up/down options combine and still preserve the input size."""
    for kw in (
        dict(layout="course", norm="instance", up="resize", up_kernel=3),
        dict(down="conv", activation="leaky_relu", dropout=0.1, pad_mode="zeros"),
        dict(up="resize", up_kernel=2, resize_mode="nearest", norm="none"),
    ):
        m = build_model("unet", "small", base=4, depth=2, **kw).eval()
        assert m(torch.randn(1, 1, 19, 26)).shape == (1, 1, 19, 26), kw


def test_unet_course_valid_512_to_373() -> None:
    """The course preset maps 512 → 373; output_size/valid_input_size agree with forward."""
    full = build_model("unet", "course")
    assert full.output_size(512) == 373
    assert full.valid_input_size(512) == 508 and full.output_size(508) == 373
    m = build_model("unet", "course", base=2).eval()  # same shape arithmetic, cheap
    assert m.output_size(512) == 373 and m.divisor == 16
    with torch.no_grad():
        assert m(torch.randn(1, 1, 512, 512)).shape == (1, 1, 373, 373)
        for h, w in [(300, 140), (188, 205)]:
            y = m(torch.randn(1, 1, h, w))
            assert y.shape[-2:] == (m.output_size(h), m.output_size(w))
    for n in (300, 511, 700):
        v = m.valid_input_size(n)
        assert abs(v - n) <= m.divisor // 2
        out, exact = m._trace(v)
        assert exact and out == m.output_size(v) > 0
    assert m.valid_input_size(1) == m.valid_input_size(100) == 140  # smallest valid input
    with pytest.raises(CellP2PError, match="too small"):
        m.output_size(40)


def test_unet_paper_valid_classic_572_to_388() -> None:
    """The Ronneberger arrangement keeps its classic 572 → 388 arithmetic."""
    m = build_model("unet", "paper", out_channels=2, base=2).eval()
    assert m.output_size(572) == 388 and m.valid_input_size(572) == 572
    assert m.valid_input_size(570) == 572
    with torch.no_grad():
        assert m(torch.randn(1, 1, 572, 188)).shape == (1, 2, 388, m.output_size(188))


@pytest.mark.parametrize("size", [(32, 32), (37, 50), (20, 33)])
def test_generator_any_size(size: tuple[int, int]) -> None:
    """The generator pads internally and returns the input size; tanh keeps values in [-1, 1]."""
    g = build_model("generator", "small", in_channels=1, out_channels=2, base=4, depth=4)
    assert g.divisor == 1 and g.output_size(size[0]) == size[0]
    y = g(torch.randn(2, 1, *size))
    assert y.shape == (2, 2, *size)
    assert y.abs().max() <= 1.0
    s = build_model("generator", "small", base=4, depth=3, final_activation="sigmoid", up="resize")
    y = s.eval()(torch.randn(1, 1, *size))
    assert y.shape == (1, 1, *size) and y.min() >= 0.0


def test_paper_parameter_counts() -> None:
    """Paper presets match the reference unet_256 (54.41 M) and 70×70 PatchGAN (2.769 M)."""
    g = build_model("generator", "paper", in_channels=3, out_channels=3)
    n = count_parameters(g)
    assert round(n / 1e6, 2) == 54.41
    assert n == 54_413_955
    d = build_model("discriminator", "paper", in_channels=6)
    n = count_parameters(d)
    assert round(n / 1e6, 3) == 2.769
    assert n == 2_768_705
    assert receptive_field(d) == 70


def _measured_receptive_field(d: nn.Module, size: int = 384) -> int:
    """Width of the input region that the centre output pixel's gradient reaches."""
    d.eval()
    with torch.no_grad():
        for p in d.parameters():
            p.fill_(0.05)
    x = torch.ones(1, d.config.in_channels, size, size, requires_grad=True)
    y = d(x)
    y[0, 0, y.shape[-2] // 2, y.shape[-1] // 2].backward()
    g = x.grad[0].abs().sum(dim=0)
    row = g[g.sum(dim=1).argmax()]
    return int((row > 0).sum())


@pytest.mark.parametrize("rf", [1, 16, 34, 70, 142, 286])
def test_receptive_field_by_gradient(rf: int) -> None:
    """Measured receptive fields equal the requested ones and receptive_field()."""
    d = build_model("discriminator", "small", in_channels=2, base=2, receptive_field=rf)
    assert receptive_field(d) == rf
    assert _measured_receptive_field(d) == rf


def test_discriminator_conditional_and_unconditional() -> None:
    """D outputs a 1-channel logit map over cat(input, output) or over the output alone."""
    d = build_model("discriminator", "small", in_channels=2, base=4)
    assert d.config.conditional and d(torch.randn(2, 2, 64, 64)).shape == (2, 1, 6, 6)
    u = build_model("discriminator", "small", in_channels=1, base=4, conditional=False)
    assert u(torch.randn(2, 1, 64, 48)).shape == (2, 1, 6, 4)
    p = build_model("discriminator", "small", in_channels=2, base=4, receptive_field=1)
    assert p(torch.randn(2, 2, 9, 11)).shape == (2, 1, 9, 11)
    with pytest.raises(CellP2PError):
        receptive_field(build_model("unet", "small", base=2, depth=1))


def test_shared_blocks() -> None:
    """The U-Net baseline and the generator are built from the same block classes."""
    models = [
        build_model("unet", "small", base=2, depth=2),
        build_model("unet", "course", base=2, depth=2),
        build_model("generator", "small", base=2, depth=3),
    ]
    for m in models:
        kinds = {type(mod) for mod in m.modules()}
        assert {ContractingBlock, ExpandingBlock, FeatureMapBlock} <= kinds, type(m)
    d = build_model("discriminator", "small", base=2)
    assert any(isinstance(mod, ContractingBlock) for mod in d.modules())


def test_eval_deterministic_train_dropout_not() -> None:
    """Eval mode is deterministic; the generator's dropout makes train mode stochastic."""
    g = build_model("generator", "small", base=4, depth=4)
    x = torch.randn(2, 1, 32, 32)
    g.eval()
    with torch.no_grad():
        assert torch.equal(g(x), g(x))
    g.train()
    with torch.no_grad():
        assert not torch.equal(g(x), g(x))
    assert sum(isinstance(m, nn.Dropout) for m in g.modules()) == 3


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("unet", dict(base=4, depth=2, norm="instance")),
        ("unet", dict(base=2, depth=2, padding="valid", layout="course", up="resize")),
        ("generator", dict(base=4, depth=3, up="resize", final_activation="none")),
        ("discriminator", dict(base=4, receptive_field=16, norm="instance")),
    ],
)
def test_model_from_config_roundtrip(kind: str, overrides: dict) -> None:
    """asdict(config) → JSON → model_from_config rebuilds an identical network."""
    m = build_model(kind, "small", in_channels=2, **overrides).eval()
    assert m.kind == kind
    cfg = json.loads(json.dumps(dataclasses.asdict(m.config)))
    m2 = model_from_config(kind, cfg).eval()
    assert type(m2) is type(m) and m2.config == m.config
    m2.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(1, 2, 40, 40)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))


def test_errors_list_choices() -> None:
    """Unknown kind, preset, override or option value raise CellP2PError naming the choices."""
    with pytest.raises(CellP2PError, match="unet, generator, discriminator"):
        build_model("gan", "small")
    with pytest.raises(CellP2PError, match="paper, course, small"):
        build_model("unet", "huge")
    with pytest.raises(CellP2PError, match=r"valid options:.*base"):
        build_model("unet", "small", widht=3)
    with pytest.raises(CellP2PError, match="batch, instance, none"):
        build_model("generator", "small", norm="group")
    with pytest.raises(CellP2PError, match="1, 16, 34, 70, 142, 286"):
        build_model("discriminator", "small", receptive_field=50)
    with pytest.raises(CellP2PError):
        model_from_config("unet", {"base": 0})


def test_init_weights_and_presets() -> None:
    """Conv weights ~ N(0, 0.02), norm weights ~ N(1, 0.02), biases 0; presets have kinds."""
    g = build_model("generator", "small")
    convs = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, nn.Conv2d)])
    assert abs(convs.std().item() - 0.02) < 0.002 and abs(convs.mean().item()) < 0.002
    bns = torch.cat([m.weight for m in g.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(bns.mean().item() - 1.0) < 0.01
    assert all(m.bias.abs().sum() == 0 for m in g.modules() if isinstance(m, nn.BatchNorm2d))
    assert isinstance(build_model("unet", "small"), UNet)
    assert isinstance(build_model("generator", "course", 3, 3), Generator)
    assert isinstance(build_model("discriminator", "course", 6), Discriminator)
    assert build_model("generator", "course").config.final_activation == "sigmoid"


def test_networks_built_for_stored_weights_skip_the_random_init():
    from cellp2p.models import build_model
    from cellp2p.models.blocks import weights_to_come

    torch.manual_seed(0)
    with weights_to_come():
        a = build_model("unet", "small")
    torch.manual_seed(0)
    b = build_model("unet", "small")
    conv = next(m for m in b.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.std() < 0.05  # N(0, 0.02): initialised outside
    with weights_to_come(), torch.device("meta"):
        assert next(build_model("generator", "paper").parameters()).is_meta  # no init on meta
    a.load_state_dict(b.state_dict())
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)
