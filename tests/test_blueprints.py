"""Blueprint catalogues: formulas, identity at birth, shapes, causality, trainability, determinism."""

import pytest
import torch

from esper.compute.blueprints import (
    CNN_CATALOGUE,
    TRANSFORMER_CATALOGUE,
    UnknownBlueprintError,
    catalogue,
    get_blueprint,
    group_count,
)

CNN_WIDTHS = (4, 8, 16, 32, 64)
TRANSFORMER_WIDTHS = (32, 64, 384)
CNN = [pytest.param(b, id=b.name) for b in CNN_CATALOGUE]
TRANSFORMER = [pytest.param(b, id=b.name) for b in TRANSFORMER_CATALOGUE]
ALL = CNN + [pytest.param(b, id=f"t-{b.name}") for b in TRANSFORMER_CATALOGUE]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample(blueprint, width: int, g: torch.Generator, spatial=(5, 3), tokens=7, batch=2) -> torch.Tensor:
    if blueprint.topology == "cnn":
        return torch.randn(batch, width, *spatial, generator=g)
    return torch.randn(batch, tokens, width, generator=g)


def trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def randomise_(module, g: torch.Generator) -> None:
    """Move every weight off its zero init so the branch really computes something."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(generator=g)


def test_catalogue_order():
    assert [b.name for b in catalogue("cnn")] == ["noop", "norm", "attention", "depthwise", "conv_light", "conv_heavy"]
    assert [b.name for b in catalogue("transformer")] == ["noop", "norm", "lora", "attention", "mlp"]
    assert all(b.identity_at_birth for b in CNN_CATALOGUE + TRANSFORMER_CATALOGUE)
    assert all(b.causal for b in TRANSFORMER_CATALOGUE)


@pytest.mark.parametrize("blueprint", CNN)
@pytest.mark.parametrize("width", CNN_WIDTHS)
def test_cnn_formula_matches_module(blueprint, width):
    assert trainable(blueprint.build(width, gen())) == blueprint.param_count(width)


@pytest.mark.parametrize("blueprint", TRANSFORMER)
@pytest.mark.parametrize("width", TRANSFORMER_WIDTHS)
def test_transformer_formula_matches_module(blueprint, width):
    assert trainable(blueprint.build(width, gen())) == blueprint.param_count(width)


def test_formulas_match_spec_tables():
    cnn = {
        "noop": (0, 0, 0, 0),
        "norm": (17, 33, 65, 129),
        "attention": (32, 128, 512, 2048),
        "depthwise": (160, 448, 1408, 4864),
        "conv_light": (600, 2352, 9312, 37056),
        "conv_heavy": (1192, 4688, 18592, 74048),
    }
    for name, counts in cnn.items():
        assert tuple(get_blueprint("cnn", name).param_count(c) for c in (8, 16, 32, 64)) == counts
    transformer = {"noop": (0, 0), "norm": (129, 769), "lora": (1024, 6144), "attention": (16640, 591360),
                   "mlp": (33088, 1181568)}
    for name, counts in transformer.items():
        assert tuple(get_blueprint("transformer", name).param_count(d) for d in (64, 384)) == counts


def test_group_count():
    assert [group_count(c) for c in (4, 8, 16, 24, 32, 48, 64, 80)] == [1, 1, 1, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("blueprint", ALL)
def test_identity_at_birth(blueprint):
    width = 8 if blueprint.topology == "cnn" else 32
    g = gen()
    module = blueprint.build(width, g)
    x = sample(blueprint, width, g)
    assert torch.equal(module(x), x)


@pytest.mark.parametrize("blueprint", ALL)
def test_shape_preserved(blueprint):
    width = 8 if blueprint.topology == "cnn" else 32
    g = gen()
    module = blueprint.build(width, g)
    randomise_(module, g)
    if blueprint.topology == "cnn":
        inputs = [sample(blueprint, width, g, spatial=hw) for hw in ((1, 1), (3, 5), (8, 8), (7, 2))]
    else:
        inputs = [sample(blueprint, width, g, tokens=t) for t in (1, 5, 32)]
    for x in inputs:
        assert module(x).shape == x.shape


@pytest.mark.parametrize("blueprint", TRANSFORMER)
def test_transformer_blueprints_are_causal(blueprint):
    g = gen(3)
    module = blueprint.build(32, g)
    randomise_(module, g)
    x = sample(blueprint, 32, g, tokens=12)
    perturbed = x.clone()
    perturbed[:, 6:] += 5 * torch.randn(2, 6, 32, generator=g)
    y, y_perturbed = module(x), module(perturbed)
    assert torch.allclose(y[:, :6], y_perturbed[:, :6], rtol=0, atol=1e-6)
    if blueprint.name != "noop":
        assert not torch.allclose(y[:, 6:], y_perturbed[:, 6:])


# channels_last inputs guard the GroupNorm backward crash of runtime §3.3.
STEP_CASES = [pytest.param(*c.values, False, id=c.id) for c in ALL] + [
    pytest.param(*c.values, True, id=f"{c.id}-channels_last") for c in CNN
]


@pytest.mark.parametrize(("blueprint", "channels_last"), STEP_CASES)
def test_one_sgd_step(blueprint, channels_last):
    width = 16 if blueprint.topology == "cnn" else 32
    g = gen()
    module = blueprint.build(width, g)
    # A batch of 8 keeps squeeze-excitation's small ReLU bottleneck from being dead on every sample.
    x = sample(blueprint, width, g, batch=8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in module.parameters()]
    loss = (module(x.requires_grad_()) - torch.randn(x.shape, generator=g)).square().mean()
    loss.backward()
    assert torch.isfinite(x.grad).all()
    if before:
        torch.optim.SGD(module.parameters(), lr=0.1).step()
        after = list(module.parameters())
        assert all(torch.isfinite(p).all() for p in after)
        assert any(not torch.equal(b, a) for b, a in zip(before, after))


@pytest.mark.parametrize("blueprint", ALL)
def test_same_generator_seed_same_weights_and_global_rng_untouched(blueprint):
    width = 8 if blueprint.topology == "cnn" else 32
    global_state = torch.get_rng_state()
    first = blueprint.build(width, gen(5)).state_dict()
    torch.manual_seed(1234)  # a different global stream must not matter
    second = blueprint.build(width, gen(5)).state_dict()
    torch.set_rng_state(global_state)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    before = torch.get_rng_state()
    blueprint.build(width, gen(5))
    assert torch.equal(before, torch.get_rng_state())


def test_different_generator_seed_different_weights():
    a = get_blueprint("cnn", "conv_light").build(8, gen(1)).state_dict()
    b = get_blueprint("cnn", "conv_light").build(8, gen(2)).state_dict()
    assert not torch.equal(a["branch.0.weight"], b["branch.0.weight"])


def test_unknown_blueprint():
    with pytest.raises(UnknownBlueprintError) as err:
        get_blueprint("cnn", "convx")
    assert str(err.value) == (
        "unknown blueprint 'convx' for topology cnn (choose from noop, norm, attention, depthwise, conv_light, conv_heavy)"
    )
    assert isinstance(err.value, ValueError)
    with pytest.raises(UnknownBlueprintError, match="choose from noop, norm, lora, attention, mlp"):
        get_blueprint("transformer", "conv_light")
