"""Exact masked sequential sampling of the factored action (policy §5.1), and its re-evaluation.

Order: op over the ops valid on at least one slot; if op ≠ WAIT, slot over the slots where (op, slot)
is valid; if op = GERMINATE, blueprint over that slot's valid blueprints and blend over the kinds.
Masked logits are −1e9 in fp32, so invalid entries get probability exactly 0. A head that is not
reached is *not applicable*: stored index 0, log-prob 0, entropy 0, flag 0.

Sampling is by inverse CDF from uniforms the caller provides (four per decision, one per head, drawn
whether or not the head is reached), so each env's stream advances by the same amount every step
and a decision depends only on that env's generator: which process or batch steps an env never
changes its samples (§7.3). An index lands only where the CDF rises, i.e. on an entry of non-zero
probability; the one rounding case (target at the very top) falls back to the last valid entry.

The masks stored with a transition are the rows actually used: the op mask, the slot mask of the
sampled op, and the blueprint and blend masks of the sampled slot. `evaluate_actions` recomputes
log-probs and entropies from exactly those rows in the update (they are never rebuilt).
"""

from collections.abc import Sequence

import attrs
import torch
from torch.nn import functional as F

from esper.policy.actions import GERMINATE, OPS, ActionTable
from esper.policy.network import N_OPS, PolicyNetwork

HEADS = ("op", "slot", "blueprint", "blend")
MASKED_LOGIT = -1e9
WAIT_INDEX, GERMINATE_INDEX = 0, OPS.index(GERMINATE)
UNIFORMS_PER_STEP = len(HEADS)


@attrs.frozen(eq=False)
class MaskSet:
    """The full conditional masks of one decision (or a batch of them, with a leading axis)."""

    op: torch.Tensor  # (5,) bool
    slot: torch.Tensor  # (5, S): row = op
    blueprint: torch.Tensor  # (S, B): row = slot
    blend: torch.Tensor  # (K,)

    @classmethod
    def from_table(cls, table: ActionTable) -> "MaskSet":
        return cls(
            op=torch.tensor(table.op_mask(), dtype=torch.bool),
            slot=torch.tensor([table.slot_mask(op) for op in OPS], dtype=torch.bool).reshape(
                N_OPS, len(table.slot_ids)),
            blueprint=torch.tensor([table.blueprint_mask(s) for s in table.slot_ids], dtype=torch.bool).reshape(
                len(table.slot_ids), len(table.blueprint_ids)),
            blend=torch.tensor(table.blend_mask(), dtype=torch.bool),
        )

    @classmethod
    def stack(cls, masks: Sequence["MaskSet"]) -> "MaskSet":
        return cls(*(torch.stack([getattr(m, f.name) for m in masks]) for f in attrs.fields(cls)))


@attrs.frozen(eq=False)
class ActionSample:
    """One decision per row. `actions`, `log_probs`, `entropies` and `applicable` are (N, 4) in
    head order (op, slot, blueprint, blend); the masks are the rows used, to store with the step."""

    actions: torch.Tensor  # long
    log_probs: torch.Tensor  # float32, 0 where not applicable
    entropies: torch.Tensor  # float32 (nats), 0 where not applicable
    applicable: torch.Tensor  # bool
    value: torch.Tensor  # (N,)
    op_mask: torch.Tensor  # (N, 5)
    slot_mask: torch.Tensor  # (N, S)
    blueprint_mask: torch.Tensor  # (N, B)
    blend_mask: torch.Tensor  # (N, K)

    def row(self, i: int) -> "ActionSample":
        return ActionSample(*(getattr(self, f.name)[i:i + 1] for f in attrs.fields(ActionSample)))


def policy_generator(seed: int) -> torch.Generator:
    """A CPU generator for one env's policy stream (`policy_seed(run, env)`; torch takes 63 bits)."""
    g = torch.Generator()
    g.manual_seed(seed >> 1)
    return g


def draw_uniforms(generators: Sequence[torch.Generator]) -> torch.Tensor:
    """(N, 4) float64 uniforms in [0, 1), row i from generator i: one per head per decision."""
    if not generators:
        return torch.zeros(0, UNIFORMS_PER_STEP, dtype=torch.float64)
    return torch.stack([torch.rand(UNIFORMS_PER_STEP, generator=g, dtype=torch.float64) for g in generators])


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(torch.where(mask, logits, torch.full_like(logits, MASKED_LOGIT)), dim=-1)


def _entropy(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entropy over the valid entries only (an all-masked row gives 0)."""
    return -torch.where(mask, logp.exp() * logp, torch.zeros_like(logp)).sum(-1)


def _pick(logp: torch.Tensor, mask: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """Inverse-CDF draw (u given) or argmax (greedy, u None) among the valid entries."""
    if u is None:
        return torch.where(mask, logp, torch.full_like(logp, -torch.inf)).argmax(-1)
    p = torch.where(mask, logp.double().exp(), torch.zeros((), dtype=torch.float64, device=logp.device))
    cdf = p.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    index = (cdf <= target).sum(-1)  # the first entry whose CDF exceeds the target
    n = mask.shape[-1]
    last_valid = n - 1 - mask.flip(-1).to(torch.int64).argmax(-1)
    return torch.where(index >= n, last_valid, index)


def _require(ok: torch.Tensor, what: str) -> None:
    if not bool(ok.all()):
        raise ValueError(f"an applicable {what} mask has no valid entry")


@torch.no_grad()
def sample_actions(net: PolicyNetwork, z: torch.Tensor, masks: MaskSet, uniforms: torch.Tensor | None = None,
                   *, greedy: bool = False) -> ActionSample:
    """Sample (or take the argmax of, `greedy`) every row's factored action from z (N, H)."""
    n, device = z.shape[0], z.device
    rows = torch.arange(n, device=device)
    if not greedy and (uniforms is None or uniforms.shape != (n, UNIFORMS_PER_STEP)):
        raise ValueError(f"sampling needs uniforms of shape ({n}, {UNIFORMS_PER_STEP})")
    u = (lambda h: None) if greedy else (lambda h: uniforms[:, h].to(device, torch.float64))
    zero = torch.zeros(n, dtype=torch.long, device=device)

    _require(masks.op.any(-1), "op")
    op_lp = masked_log_softmax(net.op_logits(z), masks.op)
    op = _pick(op_lp, masks.op, u(0))

    slot_on = op != WAIT_INDEX
    slot_mask = masks.slot[rows, op]
    _require(slot_mask.any(-1) | ~slot_on, "slot")
    slot_lp = masked_log_softmax(net.slot_logits(z, op), slot_mask)
    slot = torch.where(slot_on, _pick(slot_lp, slot_mask | ~slot_on.unsqueeze(-1), u(1)), zero)

    germ = op == GERMINATE_INDEX
    bp_mask = masks.blueprint[rows, slot]
    blend_mask = masks.blend
    _require(bp_mask.any(-1) | ~germ, "blueprint")
    _require(blend_mask.any(-1) | ~germ, "blend")
    bp_lp = masked_log_softmax(net.blueprint_logits(z, slot), bp_mask)
    blend_lp = masked_log_softmax(net.blend_logits(z, slot), blend_mask)
    on = germ.unsqueeze(-1)
    blueprint = torch.where(germ, _pick(bp_lp, bp_mask | ~on, u(2)), zero)
    blend = torch.where(germ, _pick(blend_lp, blend_mask | ~on, u(3)), zero)

    actions = torch.stack([op, slot, blueprint, blend], dim=-1)
    applicable = torch.stack([torch.ones_like(slot_on), slot_on, germ, germ], dim=-1)
    lps = (op_lp, slot_lp, bp_lp, blend_lp)
    row_masks = (masks.op, slot_mask, bp_mask, blend_mask)
    log_probs = torch.stack([lp.gather(-1, actions[:, h:h + 1]).squeeze(-1) for h, lp in enumerate(lps)], -1)
    entropies = torch.stack([_entropy(lp, m) for lp, m in zip(lps, row_masks)], -1)
    zeros = torch.zeros_like(log_probs)
    return ActionSample(
        actions=actions,
        log_probs=torch.where(applicable, log_probs, zeros),
        entropies=torch.where(applicable, entropies, zeros),
        applicable=applicable,
        value=net.value(z),
        op_mask=masks.op.clone(),
        slot_mask=slot_mask,
        blueprint_mask=bp_mask,
        blend_mask=blend_mask.clone(),
    )


@attrs.frozen(eq=False)
class Evaluation:
    """Per step (flat, M rows): what the current network makes of the stored actions."""

    log_probs: torch.Tensor  # (M, 4), 0 where not applicable
    entropies: torch.Tensor  # (M, 4) nats, 0 where not applicable
    n_valid: torch.Tensor  # (M, 4) valid entries of each stored mask
    values: torch.Tensor  # (M,)


def evaluate_actions(net: PolicyNetwork, z: torch.Tensor, actions: torch.Tensor, applicable: torch.Tensor,
                     op_mask: torch.Tensor, slot_mask: torch.Tensor, blueprint_mask: torch.Tensor,
                     blend_mask: torch.Tensor) -> Evaluation:
    """Log-probs and entropies of stored actions under the stored masks; the sampled op and slot
    feed the conditional heads (§5.4). Differentiable: the update's only path to the heads."""
    op, slot = actions[:, 0], actions[:, 1]
    heads = (
        (net.op_logits(z), op_mask),
        (net.slot_logits(z, op), slot_mask),
        (net.blueprint_logits(z, slot), blueprint_mask),
        (net.blend_logits(z, slot), blend_mask),
    )
    lp_cols, ent_cols, valid_cols = [], [], []
    for h, (logits, mask) in enumerate(heads):
        logp = masked_log_softmax(logits, mask)
        lp_cols.append(logp.gather(-1, actions[:, h:h + 1]).squeeze(-1))
        ent_cols.append(_entropy(logp, mask))
        valid_cols.append(mask.sum(-1))
    zeros = torch.zeros(z.shape[0], len(HEADS), dtype=z.dtype, device=z.device)
    return Evaluation(
        log_probs=torch.where(applicable, torch.stack(lp_cols, -1), zeros),
        entropies=torch.where(applicable, torch.stack(ent_cols, -1), zeros),
        n_valid=torch.stack(valid_cols, -1),
        values=net.value(z),
    )
