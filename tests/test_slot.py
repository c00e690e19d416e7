"""Seed slots: exact isolation, blending, alpha overrides, gated blend, leak counting."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esper.compute.blueprints import get_blueprint
from esper.compute.hosts import CNN_PRESETS, TRANSFORMER_PRESETS, CNNHost, TransformerHost
from esper.compute.slot import GrowingModel, SeedSlot, count_leaks

SLOTS = ["early", "mid", "late"]
SEED_BLUEPRINT = {"cnn": "conv_light", "transformer": "mlp"}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_host(topology: str, seed: int = 0) -> nn.Module:
    if topology == "cnn":
        return CNNHost(CNN_PRESETS["digits"], gen(seed))
    return TransformerHost(TRANSFORMER_PRESETS["test"], gen(seed))


def batch(topology: str) -> tuple[torch.Tensor, torch.Tensor]:
    if topology == "cnn":
        return torch.randn(6, 1, 8, 8, generator=gen(1)), torch.randint(0, 10, (6,), generator=gen(2))
    return torch.randint(0, 256, (3, 10), generator=gen(1)), torch.randint(0, 256, (3, 10), generator=gen(2))


def loss_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2) if logits.dim() == 3 else logits, target.flatten())


def live_seed(topology: str, width: int, seed: int = 5) -> nn.Module:
    """A seed moved off its identity init, so its output differs from its input."""
    g = gen(seed)
    module = get_blueprint(topology, SEED_BLUEPRINT[topology]).build(width, g)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


def grown(topology: str, mode: str, alpha: float, isolated: bool, blend: str = "linear") -> GrowingModel:
    model = GrowingModel(make_host(topology), SLOTS)
    slot = model.slots["mid"]
    slot.attach(live_seed(topology, slot.channels), blend, gen(9))
    slot.set_slot(mode, alpha, isolated)
    return model


@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_isolated_incubation_is_exact(topology):
    x, y = batch(topology)
    plain = make_host(topology)
    model = grown(topology, "incubate", 0.0, isolated=True)
    out_plain, out_grown = plain(x), model(x)
    assert torch.equal(out_plain, out_grown)
    loss_of(out_plain, y).backward()
    loss_of(out_grown, y).backward()
    for p, q in zip(plain.parameters(), model.host_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    seed_grads = [p.grad for p in model.slots["mid"].seed_parameters()]
    assert all(g is not None for g in seed_grads) and any(g.abs().sum() > 0 for g in seed_grads)


def test_unisolated_incubation_changes_upstream_gradients():
    """The contrast that shows the isolation test can fail."""
    x, y = batch("cnn")
    plain = make_host("cnn")
    model = grown("cnn", "incubate", 0.0, isolated=False)
    loss_of(plain(x), y).backward()
    loss_of(model(x), y).backward()
    early = plain.blocks[0][0].weight.grad, model.host.blocks[0][0].weight.grad
    assert not torch.equal(*early)


@pytest.mark.parametrize("topology", ["cnn", "transformer"])
@pytest.mark.parametrize("a", [0.0, 0.2, 0.5, 0.77, 1.0])
def test_blend_is_lerp(topology, a):
    width = 8
    slot = SeedSlot("mid", topology, width)
    slot.attach(live_seed(topology, width), "linear")
    slot.set_slot("blend", a, isolated=True)
    h = torch.randn((4, width, 3, 3) if topology == "cnn" else (4, 5, width), generator=gen(3))
    s = slot.seed(h)
    out = slot(h)
    assert torch.equal(out, torch.lerp(h, s, torch.tensor(a)))
    assert torch.allclose(out, (1 - a) * h + a * s, atol=1e-6)
    assert torch.equal(slot(h), out)  # forward changed nothing
    if a == 0.0:
        assert torch.equal(out, h)
    if a == 1.0:
        assert torch.equal(out, s)


def test_fused_is_the_seed_output():
    slot = SeedSlot("late", "cnn", 8)
    slot.attach(live_seed("cnn", 8), "linear")
    slot.set_slot("fused", 1.0, isolated=False)
    h = torch.randn(2, 8, 4, 4, generator=gen(3))
    assert torch.equal(slot(h), slot.seed(h))


@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_alpha_override(topology):
    x, _ = batch(topology)
    model = grown(topology, "blend", 0.6, isolated=True).eval()
    host_only = model.host(x)
    assert torch.equal(model(x, {"mid": torch.tensor(0.0)}), host_only)
    assert not torch.allclose(model(x), host_only)
    fused = grown(topology, "blend", 1.0, isolated=True).eval()
    assert torch.equal(model(x, {"mid": torch.tensor(1.0)}), fused(x))


@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_per_sample_override(topology):
    x, _ = batch(topology)
    model = grown(topology, "blend", 0.6, isolated=True, blend="gated").eval()
    alphas = torch.linspace(0, 1, x.shape[0])
    fused = model(x, {"mid": alphas})
    for i, a in enumerate(alphas):
        alone = model(x, {"mid": a})
        assert torch.allclose(fused[i], alone[i], rtol=1e-5, atol=1e-6)
    assert torch.allclose(fused[0], model.host(x)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="alpha override"):
        model(x, {"mid": torch.zeros(x.shape[0] + 1)})


@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_gated_blend_starts_linear_and_trains_its_gate(topology):
    width = 8
    h = torch.randn((4, width, 3, 3) if topology == "cnn" else (4, 5, width), generator=gen(3))
    seed = live_seed(topology, width)
    gated, linear = SeedSlot("mid", topology, width), SeedSlot("mid", topology, width)
    gated.attach(seed, "gated", gen(7))
    linear.attach(seed, "linear")
    for a in (0.0, 0.4, 1.0):
        gated.set_slot("blend", a, isolated=True)
        linear.set_slot("blend", a, isolated=True)
        out = gated(h)
        assert torch.equal(out, linear(h))
        gated.gate.zero_grad()
        out.square().sum().backward()
        last = gated.gate[-1].weight.grad
        assert (last.abs().sum() > 0) == (0 < a < 1)


def test_gated_transformer_gate_is_per_position():
    slot = SeedSlot("mid", "transformer", 8)
    slot.attach(live_seed("transformer", 8), "gated", gen(7))
    with torch.no_grad():
        for p in slot.gate.parameters():
            p.normal_(generator=gen(8))
    slot.set_slot("blend", 0.5, isolated=False)
    h = torch.randn(2, 6, 8, generator=gen(3))
    changed = h.clone()
    changed[:, 4:] += 3.0
    assert torch.allclose(slot(h)[:, :4], slot(changed)[:, :4], rtol=0, atol=1e-6)


def test_count_leaks():
    x, y = batch("cnn")
    model = grown("cnn", "incubate", 0.0, isolated=True)
    captured = {}
    out = model(x, capture=captured)
    assert count_leaks(captured["mid"], model.host_parameters()) == 0
    loss_of(out, y).backward()  # the query keeps the graph for the real backward

    class Leaky(nn.Module):
        def __init__(self, host_param):
            super().__init__()
            self.held = [host_param]  # a captured host tensor, hidden from .parameters()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, u):
            return u * self.scale * self.held[0].mean()

    model = GrowingModel(make_host("cnn"), SLOTS)
    slot = model.slots["mid"]
    slot.attach(Leaky(model.host.head.weight), "linear")
    slot.set_slot("incubate", 0.0, isolated=True)
    captured = {}
    model(x, capture=captured)
    assert count_leaks(captured["mid"], model.host_parameters()) == 1


def test_capture_is_per_call():
    model = grown("cnn", "incubate", 0.0, isolated=True)
    x, _ = batch("cnn")
    model(x)
    captured = {}
    model(x, capture=captured)
    assert list(captured) == ["mid"]


def test_slot_commands():
    slot = SeedSlot("early", "cnn", 8)
    with pytest.raises(RuntimeError, match="no seed"):
        slot.set_slot("blend", 0.5, True)
    with pytest.raises(ValueError, match="unknown slot mode"):
        slot.set_slot("shadow", 0.5, True)
    seed = get_blueprint("cnn", "conv_light").build(8, gen())
    with pytest.raises(ValueError, match="generator"):
        slot.attach(seed, "gated")
    slot.attach(seed, "gated", gen(1))
    with pytest.raises(RuntimeError, match="already holds"):
        slot.attach(seed, "linear")
    alpha = slot.alpha
    slot.set_slot("blend", 0.2, True)
    slot.set_slot("blend", 0.4, True)
    assert slot.alpha is alpha and slot.alpha.item() == pytest.approx(0.4)
    assert slot.alpha.dtype == torch.float32 and slot.alpha.dim() == 0
    assert "alpha" not in slot.state_dict()
    r = 8 // 4
    assert sum(p.numel() for p in slot.seed_parameters()) == 9 * 64 + 3 * 8 + r * (8 + 2) + 1
    slot.discard_gate()
    assert slot.gate is None and slot.blend_kind == "linear"
    assert sum(p.numel() for p in slot.seed_parameters()) == 9 * 64 + 3 * 8
    slot.drop()
    assert slot.seed is None and slot.mode == "inert" and slot.seed_parameters() == []


def test_growing_model_parameters_and_validation():
    with pytest.raises(ValueError, match="unknown slot middle"):
        GrowingModel(make_host("cnn"), ["middle"])
    model = GrowingModel(make_host("cnn"), ["early", "late"])
    assert list(model.slots) == ["early", "late"]
    model.slots["late"].attach(get_blueprint("cnn", "conv_light").build(16, gen()), "gated", gen(1))
    host_ids = {id(p) for p in model.host_parameters()}
    assert host_ids.isdisjoint(id(p) for p in model.slots["late"].seed_parameters())
    assert sum(p.numel() for p in model.host_parameters()) == 422
    assert model.seed_param_count() == 9 * 256 + 3 * 16 + 4 * 18 + 1
    with pytest.raises(ValueError, match="not enabled: mid"):
        model(torch.zeros(2, 1, 8, 8), {"mid": torch.tensor(0.0)})
