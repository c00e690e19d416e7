"""Hosts: exact parameter counts, slot shapes, input limits, and inert slots leave outputs unchanged."""

import pytest
import torch

from esper.compute.blueprints import get_blueprint
from esper.compute.hosts import CNN_PRESETS, TRANSFORMER_PRESETS, CNNHost, SlotSpec, TransformerHost
from esper.compute.slot import GrowingModel


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    ("name", "count"), [("cifar10", 6418), ("cifar10_impaired", 494), ("digits", 422), ("synthetic", 320)]
)
def test_cnn_param_counts(name, count):
    assert CNNHost(CNN_PRESETS[name], gen()).host_param_count() == count


@pytest.mark.parametrize(("name", "count"), [("tiny", 320512), ("test", 47392)])
def test_transformer_param_counts(name, count):
    assert TransformerHost(TRANSFORMER_PRESETS[name], gen()).host_param_count() == count


@pytest.mark.parametrize(
    ("name", "shapes"),
    [
        ("cifar10", [(8, 16, 16), (16, 8, 8), (32, 4, 4)]),
        ("cifar10_impaired", [(4, 16, 16), (8, 8, 8), (16, 4, 4)]),
        ("digits", [(4, 4, 4), (8, 2, 2), (16, 2, 2)]),
        ("synthetic", [(4, 4, 4), (8, 2, 2), (16, 2, 2)]),
    ],
)
def test_cnn_slot_shapes_match_features(name, shapes):
    preset = CNN_PRESETS[name]
    host = CNNHost(preset, gen())
    assert host.topology == "cnn"
    assert host.slot_specs == tuple(
        SlotSpec(sid, shape[0], shape, i) for i, (sid, shape) in enumerate(zip(("early", "mid", "late"), shapes))
    )
    seen = {}

    def record(slot_id, h):
        seen[slot_id] = tuple(h.shape[1:])
        return h

    logits = host(torch.randn(3, preset.in_channels, preset.image_size, preset.image_size, generator=gen()), record)
    assert list(seen) == ["early", "mid", "late"]
    assert list(seen.values()) == shapes
    assert logits.shape == (3, preset.classes)


@pytest.mark.parametrize(("name", "positions"), [("tiny", (1, 3, 5)), ("test", (0, 1, 2))])
def test_transformer_slots(name, positions):
    preset = TRANSFORMER_PRESETS[name]
    host = TransformerHost(preset, gen())
    assert host.topology == "transformer"
    assert [s.slot_id for s in host.slot_specs] == ["early", "mid", "late"]
    assert tuple(s.position for s in host.slot_specs) == positions
    assert all(s.channels == preset.width and s.feature_shape == (preset.block_size, preset.width)
               for s in host.slot_specs)
    seen = []
    logits = host(torch.randint(0, 256, (2, 9), generator=gen()), lambda sid, h: seen.append(sid) or h)
    assert seen == ["early", "mid", "late"]
    assert logits.shape == (2, 9, 256)


def test_transformer_rejects_too_long_input():
    host = TransformerHost(TRANSFORMER_PRESETS["test"], gen())
    host(torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="block size"):
        host(torch.zeros(1, 33, dtype=torch.long))


def test_transformer_host_is_causal():
    host = TransformerHost(TRANSFORMER_PRESETS["test"], gen())
    idx = torch.randint(0, 256, (2, 16), generator=gen(1))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    assert torch.allclose(host(idx)[:, :10], host(changed)[:, :10], rtol=0, atol=1e-6)


def test_same_generator_same_host_and_global_rng_untouched():
    before = torch.get_rng_state()
    a = CNNHost(CNN_PRESETS["cifar10"], gen(4)).state_dict()
    b = CNNHost(CNN_PRESETS["cifar10"], gen(4)).state_dict()
    c = TransformerHost(TRANSFORMER_PRESETS["test"], gen(4)).state_dict()
    d = TransformerHost(TRANSFORMER_PRESETS["test"], gen(4)).state_dict()
    assert torch.equal(before, torch.get_rng_state())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(c[k], d[k]) for k in c)


class Exploding(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("an inert slot must not run its seed")


@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_inert_slots_leave_host_output_unchanged(topology):
    if topology == "cnn":
        host = CNNHost(CNN_PRESETS["digits"], gen()).eval()
        x = torch.randn(4, 1, 8, 8, generator=gen(1))
    else:
        host = TransformerHost(TRANSFORMER_PRESETS["test"], gen()).eval()
        x = torch.randint(0, 256, (2, 12), generator=gen(1))
    model = GrowingModel(host, ["early", "mid", "late"])
    reference = host(x)
    assert torch.equal(model(x), reference)
    model.slots["early"].attach(Exploding(), "linear")
    width = host.slot_specs[1].channels
    model.slots["mid"].attach(get_blueprint(topology, "norm").build(width, gen(2)), "gated", gen(3))
    assert torch.equal(model(x), reference)
