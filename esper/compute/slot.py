"""Seed slots (lifecycle §4.2–4.3) and the host-plus-slots model that training runs.

Forward never mutates module state: alpha overrides and seed-output capture are per-call
arguments, so counterfactual passes are re-entrant and safe under threads and compile.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping

import torch
from torch import nn

from esper.compute.blueprints import on_generator

MODES = ("inert", "incubate", "blend", "fused")
BLEND_KINDS = ("linear", "sigmoid", "gated")


def make_gate(channels: int, generator: torch.Generator) -> nn.Sequential:
    """The gated blend's g-network before its sigmoid; a zero last layer makes g = ½ at birth."""
    reduced = max(1, channels // 4)
    gate = on_generator(
        lambda: nn.Sequential(nn.Linear(channels, reduced), nn.ReLU(), nn.Linear(reduced, 1)), generator
    )
    for p in gate[-1].parameters():
        nn.init.zeros_(p)
    return gate


def _as_weight(alpha: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A 0-dim alpha, or one per sample (B,) reshaped to broadcast over h's feature dims."""
    alpha = alpha.to(device=h.device, dtype=h.dtype)
    if alpha.dim() == 0:
        return alpha
    if alpha.dim() != 1 or alpha.shape[0] != h.shape[0]:
        raise ValueError(f"alpha override of shape {tuple(alpha.shape)} for features {tuple(h.shape)}")
    return alpha.view(-1, *([1] * (h.dim() - 1)))


class SeedSlot(nn.Module):
    """One injection point: an optional seed module, its optional gate, and how it enters the forward."""

    def __init__(self, slot_id: str, topology: str, channels: int):
        super().__init__()
        self.slot_id = slot_id
        self.topology = topology
        self.channels = channels
        self.register_module("seed", None)
        self.register_module("gate", None)
        # A buffer, not a Python float, so a ramp step changes data rather than a compiled graph's guard.
        self.register_buffer("alpha", torch.zeros((), dtype=torch.float32), persistent=False)
        self.mode = "inert"
        self.blend_kind = "linear"
        self.isolated = False

    def attach(self, seed: nn.Module, blend_kind: str, generator: torch.Generator | None = None) -> None:
        if self.seed is not None:
            raise RuntimeError(f"slot {self.slot_id} already holds a seed")
        if blend_kind not in BLEND_KINDS:
            raise ValueError(f"unknown blend kind {blend_kind!r} (choose from {', '.join(BLEND_KINDS)})")
        if blend_kind == "gated":
            if generator is None:
                raise ValueError("a gated blend needs a generator for its gate weights")
            self.gate = make_gate(self.channels, generator).to(self.alpha.device)
        self.seed = seed.to(self.alpha.device)
        self.blend_kind = blend_kind

    def drop(self) -> None:
        self.seed = None
        self.gate = None
        self.blend_kind = "linear"
        self.set_slot("inert", 0.0, False)

    def discard_gate(self) -> None:
        self.gate = None
        self.blend_kind = "linear"

    def set_slot(self, mode: str, alpha: float, isolated: bool) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown slot mode {mode!r} (choose from {', '.join(MODES)})")
        if mode != "inert" and self.seed is None:
            raise RuntimeError(f"slot {self.slot_id} has no seed to put in mode {mode}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha {alpha} is outside [0, 1]")
        self.mode = mode
        self.alpha.fill_(alpha)
        self.isolated = isolated

    def seed_parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.seed, self.gate) if m is not None for p in m.parameters()]

    def _blend_weight(self, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        a = self.alpha.to(h.dtype)
        if self.gate is None:
            return a
        if self.topology == "cnn":
            g = torch.sigmoid(self.gate(u.mean(dim=(2, 3)))).view(-1, 1, 1, 1)
        else:
            # Per position: pooling over the sequence would let the gate read future tokens.
            g = torch.sigmoid(self.gate(u))
        return (a + a * (1 - a) * (2 * g - 1)).to(h.dtype)

    def forward(
        self,
        h: torch.Tensor,
        alpha_override: torch.Tensor | None = None,
        capture: MutableMapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if self.mode == "inert":  # the seed is out of the forward pass, so an override has nothing to mix
            return h
        u = h.detach() if self.isolated else h
        s = self.seed(u).to(h.dtype)
        if capture is not None:
            capture[self.slot_id] = s
        if alpha_override is not None:
            return torch.lerp(h, s, _as_weight(alpha_override, h))
        if self.mode == "incubate":
            # Straight-through: the value is exactly h, the seed gets dL/dout as if it replaced h.
            return h + (s - s.detach())
        if self.mode == "blend":
            return torch.lerp(h, s, self._blend_weight(u, h))
        return torch.lerp(h, s, 1.0)


def count_leaks(seed_output: torch.Tensor, host_params: Iterable[nn.Parameter]) -> int:
    """Distinct host parameters that autograd reaches from the seed output (lifecycle §4.3).

    Only the seed path is queried, so the host's ordinary direct-path gradient is never counted.
    """
    params = list({id(p): p for p in host_params if p.requires_grad}.values())
    if not params or not seed_output.requires_grad:
        return 0
    grads = torch.autograd.grad(
        seed_output, params, torch.ones_like(seed_output), retain_graph=True, allow_unused=True
    )
    return sum(g is not None for g in grads)


class GrowingModel(nn.Module):
    """A host plus one SeedSlot per enabled slot, applied at the host's slot boundaries."""

    def __init__(self, host: nn.Module, slot_ids_enabled: Iterable[str]):
        super().__init__()
        enabled = set(slot_ids_enabled)
        known = [spec.slot_id for spec in host.slot_specs]
        unknown = sorted(enabled - set(known))
        if unknown:
            raise ValueError(f"unknown slot {', '.join(unknown)} (choose from {', '.join(known)})")
        self.host = host
        self.slots = nn.ModuleDict(
            {
                spec.slot_id: SeedSlot(spec.slot_id, host.topology, spec.channels)
                for spec in host.slot_specs
                if spec.slot_id in enabled
            }
        )

    def forward(
        self,
        x: torch.Tensor,
        alpha_override: Mapping[str, torch.Tensor] | None = None,
        capture: MutableMapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`alpha_override` maps slot id → alpha tensor; `capture`, if given, receives each running seed's output."""
        overrides = alpha_override or {}
        stray = set(overrides) - set(self.slots.keys())
        if stray:
            raise ValueError(f"alpha override for slots that are not enabled: {', '.join(sorted(stray))}")

        def apply_slot(slot_id: str, h: torch.Tensor) -> torch.Tensor:
            if slot_id not in self.slots:
                return h
            return self.slots[slot_id](h, overrides.get(slot_id), capture)

        return self.host(x, apply_slot)

    def host_parameters(self) -> list[nn.Parameter]:
        return list(self.host.parameters())

    def seed_param_count(self) -> int:
        return sum(p.numel() for slot in self.slots.values() for p in slot.seed_parameters())
