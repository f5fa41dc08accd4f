import functools

import pytest
import torch
import torch.nn.functional as F

from learn2defend.errors import UserError
from learn2defend.models import (
    ATTACKERS,
    Normalize,
    create_attacker,
    create_model,
    list_models,
)

BIG = {"wrn-28-10", "wrn-34-10"}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.cache
def cifar_model(name: str) -> torch.nn.Module:
    # The big WRNs take about a second each to build; build each 3x32x32 model once.
    torch.manual_seed(0)
    return create_model(name, num_classes=10).eval()


# --- classifiers -----------------------------------------------------------------------------


def test_list_models():
    names = list_models()
    assert names == sorted(names)
    assert {"smallcnn", "preact-resnet18", "wrn-16-4", "wrn-28-10", "wrn-34-4", "wrn-34-10"} <= set(
        names
    )
    assert list_models("wrn*") == ["wrn-16-4", "wrn-28-10", "wrn-34-10", "wrn-34-4"]
    assert list_models("nothing*") == []


@pytest.mark.parametrize("name", list_models())
def test_cifar_shape(name):
    with torch.no_grad():
        out = cifar_model(name)(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [8, 28])
@pytest.mark.parametrize("name", [n for n in list_models() if n not in BIG])
def test_grayscale_shapes(name, size):
    model = create_model(name, num_classes=7, in_channels=1, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.rand(3, 1, size, size)).shape == (3, 7)


def test_big_wrn_takes_small_grayscale():
    # Same definition as wrn-34-4; one cheap forward is enough to show the big ones adapt too.
    model = create_model("wrn-34-10", num_classes=3, in_channels=1, image_size=8).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize(
    "name, expected",
    [("wrn-34-10", 46_160_474), ("wrn-28-10", 36_479_194), ("preact-resnet18", 11_172_170)],
)
def test_parameter_counts_match_references(name, expected):
    # RobustBench's WRN-34-10 / WRN-28-10 and Rice et al.'s PreAct ResNet-18, 10 classes.
    assert abs(n_params(cifar_model(name)) - expected) / expected < 0.005


def test_smallcnn_pooled_same_weights_quarter_resolution():
    # The same layers and weights; only the resolution differs: the last conv sees 8x8, not 16x16.
    small, pooled = cifar_model("smallcnn"), cifar_model("smallcnn-pooled")
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in pooled.state_dict().items()}
    seen = []
    pooled.conv3.register_forward_hook(lambda m, i, o: seen.append(o.shape[-2:]))
    with torch.no_grad():
        pooled.eval()(torch.rand(1, 3, 32, 32))
    assert seen == [(8, 8)]


def test_normalize_inside_model():
    torch.manual_seed(0)
    mean, std = (0.1, 0.2, 0.3), (0.2, 0.25, 0.5)
    model = create_model("smallcnn", num_classes=10, mean=mean, std=std).eval()
    sd = model.state_dict()
    assert sd["normalize.mean"].shape == (1, 3, 1, 1)
    assert sd["normalize.std"].flatten().tolist() == pytest.approx(std)

    # Same weights, identity normalization: must see the already-normalized images.
    plain = create_model("smallcnn", num_classes=10, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    plain.load_state_dict(
        {**sd, "normalize.mean": torch.zeros(1, 3, 1, 1), "normalize.std": torch.ones(1, 3, 1, 1)}
    )
    x = torch.rand(4, 3, 32, 32)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain((x - m) / s))
        assert not torch.allclose(model(x), plain(x))


@pytest.mark.parametrize("name", list_models())
def test_every_model_normalizes_first(name):
    model = cifar_model(name) if name in BIG else create_model(name, num_classes=10)
    assert isinstance(model.normalize, Normalize)
    assert model.normalize.mean.flatten().tolist() == [0.5] * 3  # the default
    assert "normalize.mean" in model.state_dict() and "normalize.std" in model.state_dict()


def test_unknown_model():
    with pytest.raises(UserError, match="unknown model 'resnet9000'; choose one of: .*smallcnn"):
        create_model("resnet9000", num_classes=10)


@pytest.mark.parametrize("name, size", [("preact-resnet18", 4), ("wrn-16-4", 2), ("smallcnn", 1),
                                              ("smallcnn-pooled", 3)])
def test_too_small_image(name, size):
    with pytest.raises(UserError, match="too small"):
        create_model(name, num_classes=10, image_size=size)


@pytest.mark.parametrize("shape", [(32, 2), (2, 32), (4, 4)])
def test_too_small_height_or_width(shape):
    """The minimum size holds for the height and the width alike (1x32x2 used to pass, 1x2x32 not)."""
    with pytest.raises(UserError, match=f"{shape[0]}x{shape[1]} images are too small for model 'preact-resnet18'"):
        create_model("preact-resnet18", num_classes=10, in_channels=1, image_size=shape)


def test_non_square_images_at_the_minimum_size_work():
    model = create_model("preact-resnet18", num_classes=3, in_channels=1, image_size=(8, 16)).eval()
    assert model(torch.rand(2, 1, 8, 16)).shape == (2, 3)


def test_train_refuses_too_small_width(tmp_path):
    from learn2defend import TrainConfig, train

    with pytest.raises(UserError, match="32x2 images are too small"):
        train(TrainConfig(dataset="fake:1x32x2:2", model="preact-resnet18", epochs=1, device="cpu",
                          out=str(tmp_path / "r")))


def test_bad_arguments():
    with pytest.raises(UserError, match="3 channels"):
        create_model("smallcnn", num_classes=10, mean=(0.5,))
    with pytest.raises(UserError, match="1 channels"):
        create_model("smallcnn", num_classes=10, in_channels=1, std=(0.5, 0.5))
    with pytest.raises(UserError, match="positive"):
        create_model("smallcnn", num_classes=10, std=(0.5, 0.0, 0.5))
    with pytest.raises(UserError, match="num_classes"):
        create_model("smallcnn", num_classes=0)


def test_smallcnn_learns_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    torch.manual_seed(0)
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x))
    x, y = x[perm], y[perm]
    model = create_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for i in range(0, 1500, 64):
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x[1500:]).argmax(1) == y[1500:]).float().mean() > 0.95


# --- attackers -------------------------------------------------------------------------------


def test_attacker_names():
    assert ATTACKERS == ("slim", "wide", "sdi")
    with pytest.raises(UserError, match="unknown attacker 'huge'; choose one of: slim, wide, sdi"):
        create_attacker("huge", in_channels=3, out_channels=3)
    with pytest.raises(UserError, match="width"):
        create_attacker("slim", in_channels=3, out_channels=3, width=0)


@pytest.mark.parametrize("in_channels", [3, 6])
@pytest.mark.parametrize("kind", ATTACKERS)
def test_attacker_shape(kind, in_channels):
    attacker = create_attacker(kind, in_channels=in_channels, out_channels=3)
    out = attacker(torch.rand(2, in_channels, 32, 32), 8 / 255)
    assert out.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("kind", ATTACKERS)
def test_attacker_small_grayscale(kind):
    attacker = create_attacker(kind, in_channels=2, out_channels=1, width=0.25)
    assert attacker(torch.rand(5, 2, 8, 8), 0.3).shape == (5, 1, 8, 8)


@pytest.mark.parametrize("learnable_scale", [False, True])
@pytest.mark.parametrize("kind", ATTACKERS)
def test_attacker_output_within_eps(kind, learnable_scale):
    torch.manual_seed(0)
    attacker = create_attacker(
        kind, in_channels=6, out_channels=3, width=0.25, learnable_scale=learnable_scale
    )
    with torch.no_grad():
        for p in attacker.parameters():
            p.mul_(100)  # drive tanh deep into saturation
    eps = torch.tensor(0.03)
    out = attacker(10 * torch.randn(4, 6, 16, 16), eps)
    assert out.abs().max() <= eps
    assert out.abs().max() > 0.99 * eps  # the bound is reached, so the check above means something
    assert attacker(torch.randn(2, 6, 16, 16), 0.5).abs().max() <= 0.5


def test_learnable_scale():
    plain = create_attacker("slim", in_channels=3, out_channels=3, width=0.25)
    scaled = create_attacker(
        "slim", in_channels=3, out_channels=3, width=0.25, learnable_scale=True
    )
    assert plain.scale is None
    assert isinstance(scaled.scale, torch.nn.Parameter) and scaled.scale.item() == 5.0
    assert n_params(scaled) == n_params(plain) + 1
    scaled(torch.rand(2, 3, 8, 8), 0.1).sum().backward()
    assert scaled.scale.grad is not None


def test_attacker_gradients_reach_input():
    # The 2-step method backpropagates through the attacker to its input as well.
    attacker = create_attacker("wide", in_channels=3, out_channels=3, width=0.25)
    a = torch.rand(2, 3, 8, 8, requires_grad=True)
    attacker(a, 0.1).square().sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert all(p.grad is not None for p in attacker.parameters())


def test_slim_needs_even_size():
    attacker = create_attacker("slim", in_channels=3, out_channels=3, width=0.25)
    with pytest.raises(UserError, match="even"):
        attacker(torch.rand(2, 3, 9, 9), 0.1)
    wide = create_attacker("wide", in_channels=3, out_channels=3, width=0.25)
    assert wide(torch.rand(2, 3, 9, 9), 0.1).shape == (2, 3, 9, 9)


@pytest.mark.parametrize("kind", ATTACKERS)
def test_width_scales_parameters(kind):
    full = n_params(create_attacker(kind, in_channels=3, out_channels=3))
    half = n_params(create_attacker(kind, in_channels=3, out_channels=3, width=0.5))
    tiny = n_params(create_attacker(kind, in_channels=3, out_channels=3, width=0.01))
    # Conv weights grow with width squared.
    assert 0.2 < half / full < 0.3
    assert tiny < half


def _gmacs(module, *inputs):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() / 2e9  # the counter counts a multiply-add as 2 flops


def test_attacker_macs_follow_table1():
    # Table 1: the slim attacker's second conv downsamples, so both ResBlocks run at half size.
    x = torch.rand(1, 6, 32, 32)
    slim = _gmacs(create_attacker("slim", in_channels=6, out_channels=3), x, 0.03)
    wide = _gmacs(create_attacker("wide", in_channels=6, out_channels=3), x, 0.03)
    assert 0.30 < slim <= 0.40  # pooling after a full-size ResBlock (the old layout) cost 1.08
    assert 1.6 < wide < 2.0
    # Per pixel at 8x8 it is the same network: a quarter of the cost at a quarter of the width
    # is (0.25)^2 of the channel products, a sixteenth of the pixels.
    small = _gmacs(create_attacker("slim", in_channels=6, out_channels=3), torch.rand(1, 6, 8, 8), 0.03)
    assert small == pytest.approx(slim / 16, rel=0.05)


def test_slim_attacker_layout():
    slim = create_attacker("slim", in_channels=6, out_channels=3, width=0.25)
    shapes = {}
    for name in ("stem", "down", "block", "bn", "up"):
        getattr(slim, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    slim(torch.rand(2, 6, 32, 32), 0.03)
    assert shapes["stem"] == (2, 32, 32, 32)
    assert shapes["down"] == (2, 64, 16, 16)  # the first ResBlock's first conv has stride 2
    assert shapes["block"] == (2, 32, 16, 16)
    assert shapes["up"] == (2, 16, 32, 32)
    assert slim.down.residual[2].stride == (2, 2) and slim.down.shortcut.stride == (2, 2)
    # The last ResBlock group ends in BN alone (Table 1), no ReLU before the deconvolution.
    assert isinstance(slim.bn, torch.nn.BatchNorm2d)
    wide = create_attacker("wide", in_channels=6, out_channels=3, width=0.25)
    assert isinstance(wide.bn, torch.nn.BatchNorm2d)
    assert not any(isinstance(m, torch.nn.ReLU) for m in (slim.bn, wide.bn))
