"""Host networks (lifecycle §5): fixed architectures with three injection points.

A host holds no slot modules: `forward(x, apply_slot)` hands its features to the caller at each
slot boundary, in canonical order, and carries on with what comes back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from esper.compute.blueprints import attention_branch, default_init_, mlp_branch

SLOT_IDS: tuple[str, ...] = ("early", "mid", "late")

SlotFn = Callable[[str, torch.Tensor], torch.Tensor]


@attrs.frozen
class SlotSpec:
    slot_id: str
    channels: int
    feature_shape: tuple[int, ...]
    position: int  # index of the block (CNN) or layer (transformer) the slot follows


def _no_slots(slot_id: str, h: torch.Tensor) -> torch.Tensor:
    return h


@attrs.frozen
class CNNPreset:
    name: str
    in_channels: int
    image_size: int
    classes: int
    base: int
    blocks: int
    pool_layers: int
    kernels: tuple[int, ...] = attrs.field(converter=tuple)

    def __attrs_post_init__(self) -> None:
        if self.blocks < len(SLOT_IDS) or len(self.kernels) != self.blocks:
            raise ValueError(f"preset {self.name}: needs >= 3 blocks and one kernel size per block")


CNN_PRESETS: dict[str, CNNPreset] = {
    "cifar10": CNNPreset("cifar10", 3, 32, 10, 8, 3, 3, (3, 3, 3)),
    "cifar10_impaired": CNNPreset("cifar10_impaired", 3, 32, 10, 4, 3, 3, (3, 1, 1)),
    "digits": CNNPreset("digits", 1, 8, 10, 4, 3, 2, (3, 1, 1)),
    "synthetic": CNNPreset("synthetic", 1, 8, 4, 4, 3, 2, (3, 1, 1)),
}


class CNNHost(nn.Module):
    """Conv → BN → ReLU blocks (2×2 max-pool after the first `pool_layers`), GAP, linear head."""

    topology = "cnn"

    def __init__(self, preset: CNNPreset, generator: torch.Generator):
        super().__init__()
        self.preset = preset
        specs = []
        size, c_in = preset.image_size, preset.in_channels
        with torch.device("meta"):
            blocks = []
            for i, k in enumerate(preset.kernels):
                c_out = preset.base * 2**i
                layers = [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
                if i < preset.pool_layers:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                blocks.append(nn.Sequential(*layers))
                if i < len(SLOT_IDS):
                    specs.append(SlotSpec(SLOT_IDS[i], c_out, (c_out, size, size), i))
                c_in = c_out
            self.blocks = nn.ModuleList(blocks)
            self.head = nn.Linear(c_in, preset.classes)
        self.to_empty(device="cpu")
        default_init_(self, generator)
        self.slot_specs: tuple[SlotSpec, ...] = tuple(specs)

    def forward(self, x: torch.Tensor, apply_slot: SlotFn = _no_slots) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.slot_specs):
                x = apply_slot(self.slot_specs[i].slot_id, x)
        return self.head(x.mean(dim=(2, 3)))

    def host_param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


@attrs.frozen
class TransformerPreset:
    name: str
    vocab: int
    block_size: int
    layers: int
    width: int
    heads: int
    dropout: float

    def __attrs_post_init__(self) -> None:
        if self.layers < len(SLOT_IDS) or self.width % self.heads:
            raise ValueError(f"preset {self.name}: needs >= 3 layers and width divisible by heads")


TRANSFORMER_PRESETS: dict[str, TransformerPreset] = {
    "tiny": TransformerPreset("tiny", 256, 64, 6, 64, 4, 0.0),
    "test": TransformerPreset("test", 256, 32, 3, 32, 4, 0.0),
}


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = attention_branch(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = mlp_branch(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerHost(nn.Module):
    """GPT-style pre-norm decoder with learned positions and a head tied to the token embedding."""

    topology = "transformer"

    def __init__(self, preset: TransformerPreset, generator: torch.Generator):
        super().__init__()
        self.preset = preset
        d = preset.width
        with torch.device("meta"):
            self.tok = nn.Embedding(preset.vocab, d)
            self.pos = nn.Embedding(preset.block_size, d)
            self.drop = nn.Dropout(preset.dropout)
            self.blocks = nn.ModuleList(_Block(d, preset.heads) for _ in range(preset.layers))
            self.ln_f = nn.LayerNorm(d)
        self.to_empty(device="cpu")
        self._init_weights(generator)
        third = preset.layers // 3
        positions = (third - 1, 2 * third - 1, preset.layers - 1)
        self.slot_specs: tuple[SlotSpec, ...] = tuple(
            SlotSpec(sid, d, (preset.block_size, d), pos) for sid, pos in zip(SLOT_IDS, positions)
        )
        self._slot_after = {spec.position: spec.slot_id for spec in self.slot_specs}

    def _init_weights(self, generator: torch.Generator) -> None:
        # GPT-2 scheme: PyTorch's default N(0, 1) embeddings would give the tied head logits of
        # std ≈ √d at birth; residual projections shrink with depth so the stream's variance stays bounded.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02, generator=generator)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        residual_std = 0.02 / math.sqrt(2 * self.preset.layers)
        for block in self.blocks:
            for proj in (block.attn[-1], block.mlp[-1]):
                nn.init.normal_(proj.weight, std=residual_std, generator=generator)

    def forward(self, idx: torch.Tensor, apply_slot: SlotFn = _no_slots) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.preset.block_size:
            raise ValueError(f"sequence length {t} exceeds the block size {self.preset.block_size}")
        x = self.drop(self.tok(idx) + self.pos(torch.arange(t, device=idx.device)))
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self._slot_after:
                x = apply_slot(self._slot_after[i], x)
        return F.linear(self.ln_f(x), self.tok.weight)

    def host_param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
