"""Generalised advantage estimation per segment (policy §5.5 step 3).

A segment is a maximal run of one env's steps within one episode and one round. Its last step is
either *terminated* (the episode ended: nothing follows, next value 0) or *truncated* (the round
ended while the episode goes on: bootstrap from V of the real next observation, computed at
collection time). Inside a segment the next value is V_old of the following step, and the
advantage recursion starts from 0 past the segment's end:

    δ_t = r_t + γ·next_t − V(s_t)        A_t = δ_t + γλ·A_{t+1}        R_t = A_t + V(s_t)

Computed in float64 from plain sequences, so a hand-worked example checks it exactly.
"""

from collections.abc import Sequence

import torch


def segment_gae(rewards: Sequence[float], values: Sequence[float], *, terminated: bool,
                bootstrap_value: float | None, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (float64, length T) of one segment."""
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if r.shape != v.shape or len(r) == 0:
        raise ValueError(f"a segment needs as many rewards as values, at least one ({len(r)} vs {len(v)})")
    if terminated:
        last_next = 0.0
    else:
        if bootstrap_value is None:
            raise ValueError("a truncated segment needs the bootstrap value V(s_{t+1}) of its real next observation")
        last_next = float(bootstrap_value)
    advantages = torch.zeros_like(r)
    running = 0.0
    for t in range(len(r) - 1, -1, -1):
        next_value = last_next if t == len(r) - 1 else float(v[t + 1])
        delta = float(r[t]) + gamma * next_value - float(v[t])
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + v


def batch_gae(rewards: Sequence[Sequence[float]], values: Sequence[Sequence[float]], terminated: Sequence[bool],
              bootstrap_values: Sequence[float | None], gamma: float,
              lam: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`segment_gae` over a batch of segments; per-segment lists of advantages and returns."""
    advantages, returns = [], []
    for r, v, done, boot in zip(rewards, values, terminated, bootstrap_values, strict=True):
        a, ret = segment_gae(r, v, terminated=done, bootstrap_value=boot, gamma=gamma, lam=lam)
        advantages.append(a)
        returns.append(ret)
    return advantages, returns
