"""Blueprint catalogues (lifecycle §6): the seed modules that can be grafted into a slot.

Every entry starts as an exact identity (§6.4), through a zero-initialised last layer or a
residual form, so germination never perturbs the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import nn


class UnknownBlueprintError(ValueError):
    """A blueprint name that the topology's catalogue does not hold."""


@attrs.frozen
class Blueprint:
    name: str
    topology: str
    identity_at_birth: bool
    causal: bool
    build: Callable[[int, torch.Generator], nn.Module]
    param_count: Callable[[int], int]


def default_init_(module: nn.Module, generator: torch.Generator) -> None:
    """Initialise every parameter and buffer with PyTorch's default scheme, drawing from `generator`.

    Children come before parents, so a wrapper's own `reset_parameters` (zeroing its last layer)
    runs after the layer's random draw. Other modules' `reset_parameters` must be deterministic
    (norms, zero-inits): they never see the generator.
    """
    for m in reversed(list(module.modules())):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                bound = 1 / math.sqrt(m.weight[0].numel())
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, generator=generator)
        elif hasattr(m, "reset_parameters"):
            m.reset_parameters()


def on_generator(make: Callable[[], nn.Module], generator: torch.Generator) -> nn.Module:
    """Build on the meta device, then initialise from `generator`: torch's global RNG is never drawn."""
    with torch.device("meta"):
        module = make()
    module.to_empty(device="cpu")
    default_init_(module, generator)
    return module


def group_count(channels: int) -> int:
    """GroupNorm groups: the largest divisor of C not exceeding max(1, C // 16)."""
    limit = max(1, channels // 16)
    return max(g for g in range(1, limit + 1) if channels % g == 0)


class ContiguousGroupNorm(nn.GroupNorm):
    # GroupNorm's CPU backward on channels_last tensors crashes torch 2.13 (runtime §3.3).
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous())


def group_norm(channels: int) -> nn.GroupNorm:
    return ContiguousGroupNorm(group_count(channels), channels)


class CausalSDPA(nn.Module):
    """Fused QKV projection and causal scaled dot-product attention, without the output projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(b, t, d)


def attention_branch(width: int, heads: int) -> nn.Sequential:
    return nn.Sequential(CausalSDPA(width, heads), nn.Linear(width, width))


def mlp_branch(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))


class ZeroLastResidual(nn.Module):
    """y = x + branch(x), with the branch's last layer zeroed so that y == x at birth."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.branch = nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        for p in self.branch[-1].parameters(recurse=False):
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class LayerScaleResidual(nn.Module):
    """y = x + γ⊙branch(x) with per-channel γ starting at 0.

    The branch ends in ReLU, so zeroing its norm's affine instead would kill its gradient (§6.4).
    """

    def __init__(self, channels: int, *layers: nn.Module):
        super().__init__()
        self.branch = nn.Sequential(*layers)
        self.gamma = nn.Parameter(torch.zeros(channels, 1, 1))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.branch(x)


class TanhNormMix(nn.Module):
    """y = x + tanh(s)·(norm(x) − x) with scalar s starting at 0."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.s = nn.Parameter(torch.zeros(()))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.s) * (self.norm(x) - x)


class SqueezeExcite(nn.Module):
    """y = x·2σ(W₂ ReLU(W₁ avgpool x)); 2σ(0) = 1 exactly, so a zero W₂ starts as identity."""

    def __init__(self, channels: int):
        super().__init__()
        reduced = max(1, channels // 4)
        self.down = nn.Linear(channels, reduced, bias=False)
        self.up = nn.Linear(reduced, channels, bias=False)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.up(F.relu(self.down(x.mean(dim=(2, 3)))))
        return x * (2 * torch.sigmoid(z))[:, :, None, None]


def _conv_gn_relu(c: int) -> list[nn.Module]:
    return [nn.Conv2d(c, c, 3, padding=1, bias=False), group_norm(c), nn.ReLU()]


def _depthwise(c: int) -> nn.Module:
    return LayerScaleResidual(
        c,
        nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
        nn.Conv2d(c, c, 1, bias=False),
        group_norm(c),
        nn.ReLU(),
    )


def _entry(
    topology: str,
    name: str,
    make: Callable[[int], nn.Module],
    param_count: Callable[[int], int],
) -> Blueprint:
    return Blueprint(
        name=name,
        topology=topology,
        identity_at_birth=True,
        causal=topology == "transformer",
        build=lambda width, generator: on_generator(lambda: make(width), generator),
        param_count=param_count,
    )


CNN_CATALOGUE: tuple[Blueprint, ...] = (
    _entry("cnn", "noop", lambda c: nn.Identity(), lambda c: 0),
    _entry("cnn", "norm", lambda c: TanhNormMix(group_norm(c)), lambda c: 2 * c + 1),
    _entry("cnn", "attention", SqueezeExcite, lambda c: 2 * c * max(1, c // 4)),
    _entry("cnn", "depthwise", _depthwise, lambda c: c * c + 12 * c),
    _entry("cnn", "conv_light", lambda c: LayerScaleResidual(c, *_conv_gn_relu(c)), lambda c: 9 * c * c + 3 * c),
    _entry(
        "cnn",
        "conv_heavy",
        lambda c: LayerScaleResidual(c, *_conv_gn_relu(c), *_conv_gn_relu(c)),
        lambda c: 18 * c * c + 5 * c,
    ),
)

TRANSFORMER_CATALOGUE: tuple[Blueprint, ...] = (
    _entry("transformer", "noop", lambda d: nn.Identity(), lambda d: 0),
    _entry("transformer", "norm", lambda d: TanhNormMix(nn.LayerNorm(d)), lambda d: 2 * d + 1),
    _entry(
        "transformer",
        "lora",
        lambda d: ZeroLastResidual(nn.Linear(d, 8, bias=False), nn.Linear(8, d, bias=False)),
        lambda d: 16 * d,
    ),
    _entry("transformer", "attention", lambda d: ZeroLastResidual(*attention_branch(d, 4)), lambda d: 4 * d * d + 4 * d),
    _entry("transformer", "mlp", lambda d: ZeroLastResidual(*mlp_branch(d)), lambda d: 8 * d * d + 5 * d),
)

_CATALOGUES = {"cnn": CNN_CATALOGUE, "transformer": TRANSFORMER_CATALOGUE}


def catalogue(topology: str) -> tuple[Blueprint, ...]:
    try:
        return _CATALOGUES[topology]
    except KeyError:
        raise ValueError(f"unknown topology {topology!r} (choose from {', '.join(_CATALOGUES)})") from None


def get_blueprint(topology: str, name: str) -> Blueprint:
    entries = catalogue(topology)
    for entry in entries:
        if entry.name == name:
            return entry
    names = ", ".join(e.name for e in entries)
    raise UnknownBlueprintError(f"unknown blueprint {name!r} for topology {topology} (choose from {names})")
