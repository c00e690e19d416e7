"""What ranks exchange when a round ends (policy §7.4): each sends rank 0 its share of the round,
rank 0 updates and sends back what every replica must hold for the next round.

Rank 0 orders the gathered segments as one process would have collected them, so the update sees
the same sequence whatever the world size: by the step that closed a segment, episodes that ended
before cuts at the round boundary, then by env.
"""

from typing import Any, Callable

import attrs
import torch

from esper.policy.ppo import Segment
from esper.policy.ppo_policy import PPOPolicy

SegmentKey = tuple[int, int, int]  # (step, 0: episode ended / 1: cut at the round's end, env)
ENDED, CUT = 0, 1


@attrs.frozen(eq=False)
class RoundShare:
    """One rank's part of a round: its segments, its envs' policy states (LSTM state, sampling
    generator) for rank 0's policy file and checkpoint, and, when a checkpoint is due, what the
    checkpoint holds of each of its training envs."""

    segments: list[tuple[SegmentKey, Segment]]
    lstm: dict[int, tuple[int, torch.Tensor, torch.Tensor]]
    generators: dict[int, torch.Tensor]
    envs: dict[int, dict[str, Any]]

    @classmethod
    def of(cls, policy: PPOPolicy, segments: list[tuple[SegmentKey, Segment]], owned: list[int],
           envs: dict[int, dict[str, Any]]) -> "RoundShare":
        lstm = {i: (policy.episodes.get(i, 0), *policy.states[i]) for i in owned if i in policy.states}
        generators = {i: policy.generators[i].get_state() for i in owned if i in policy.generators}
        return cls(segments, lstm, generators, envs)


def round_segments(shares: list[RoundShare]) -> list[Segment]:
    return [segment for _, segment in sorted((p for s in shares for p in s.segments), key=lambda p: p[0])]


def round_envs(shares: list[RoundShare]) -> list[dict[str, Any]]:
    """Every training env's checkpoint part, in env order."""
    parts = {i: part for share in shares for i, part in share.envs.items()}
    return [parts[i] for i in sorted(parts)]


def adopt(policy: PPOPolicy, shares: list[RoundShare], owns: Callable[[int], bool]) -> None:
    """Rank 0's policy takes the other ranks' env states as of the round's end, so its policy file
    and checkpoint hold every env's, as one process's would; it never acts for those envs."""
    for share in shares:
        for i, (episode, h, c) in share.lstm.items():
            if not owns(i):
                policy.states[i], policy.episodes[i] = (h.to(policy.device), c.to(policy.device)), episode
        for i, state in share.generators.items():
            if not owns(i):
                generator = torch.Generator()
                generator.set_state(state)
                policy.generators[i] = generator


@attrs.frozen(eq=False)
class Publication:
    """Rank 0's word to every rank, at the start and after each update: the run-scoped batches
    appended since (each a list of records) and the state every replica acts with. The entropy
    coefficient is a function of the update counter, so the counter carries it."""

    batches: list[list[Any]]
    network: dict[str, torch.Tensor]
    normaliser: dict[str, Any]
    updates: int

    @classmethod
    def of(cls, batches: list[list[Any]], policy: PPOPolicy, updates: int) -> "Publication":
        network = {k: v.detach().cpu() for k, v in policy.net.state_dict().items()}
        return cls(batches, network, policy.normaliser.state_dict(), updates)

    def load(self, policy: PPOPolicy) -> None:
        policy.net.load_state_dict(self.network)
        policy.normaliser.load_state_dict(self.normaliser)
