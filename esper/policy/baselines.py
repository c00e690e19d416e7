"""The two baseline controllers of policy §2: `none` (always WAIT) and `random` (uniform, masked).

Both record complete decisions, the legal-value summary included, so runs of every policy kind
can be audited the same way. `random` samples the factored action of §5.1 with every logit
equal; its log-probs and entropies are exact (those of a uniform choice), its value is null.
"""

import math
import random

from esper.compute.observation import Observation
from esper.events.catalogue import Blend, PolicyCommand, PolicyDecided
from esper.lifecycle.blend import BLEND_KINDS
from esper.policy.actions import GERMINATE, WAIT, head_values, legal_summary, valid_actions
from esper.policy.seeding import policy_seed

HEADS = ("op", "slot", "blueprint", "blend")


class NonePolicy:
    """The no-seed baseline: every decision is WAIT."""

    name = "none"
    policy_id = "none-v1"

    def reset(self, env: int, episode: int, max_epochs: int) -> None:
        pass

    def decide(self, observation: Observation) -> PolicyDecided:
        table = valid_actions(observation)
        action, index = head_values(table, None)
        return PolicyDecided(
            epoch=observation.epoch, policy=self.name, policy_id=self.policy_id, commands=(),
            action=action, action_index=index, legal=legal_summary(table), rationale="none: always wait",
        )

    def state_dict(self) -> dict:
        return {"kind": self.name}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.name:
            raise ValueError(f"not a {self.name} policy state: {state.get('kind')!r}")


class RandomPolicy:
    """Uniform over valid ops, then over the slots valid for that op, then over the slot's valid
    blueprints and the blend kinds. One generator per env, seeded from (run seed, env) (§7.3),
    never reset between episodes: which process steps an env never changes its samples."""

    name = "random"
    policy_id = "random-v1"

    def __init__(self, run_seed: int, env: int, blend_kinds: tuple[str, ...] = BLEND_KINDS):
        self.run_seed, self.env, self.blend_kinds = run_seed, env, tuple(blend_kinds)
        self.rng = random.Random(policy_seed(run_seed, env))

    def reset(self, env: int, episode: int, max_epochs: int) -> None:
        self._check_env(env)

    def _check_env(self, env: int) -> None:
        # Sharing one stream between envs would make samples depend on stepping order.
        if env != self.env:
            raise ValueError(f"this random policy samples for env {self.env}, not env {env}")

    def decide(self, observation: Observation) -> PolicyDecided:
        self._check_env(observation.env)
        table = valid_actions(observation, self.blend_kinds)
        choices = {"op": len(table.ops)}
        op = table.ops[self.rng.randrange(len(table.ops))]
        command = None
        if op != WAIT:
            slots = table.slots[op]
            choices["slot"] = len(slots)
            slot = slots[self.rng.randrange(len(slots))]
            blueprint = blend = None
            if op == GERMINATE:
                blueprints = table.blueprints[slot]
                choices["blueprint"], choices["blend"] = len(blueprints), len(table.blend_kinds)
                blueprint = blueprints[self.rng.randrange(len(blueprints))]
                kind = table.blend_kinds[self.rng.randrange(len(table.blend_kinds))]
                blend = Blend(kind=kind, steps=observation.lifecycle.blend_steps)
            command = PolicyCommand(op=op, slot=slot, blueprint=blueprint, blend=blend, reason="random")
        action, index = head_values(table, command)
        # Heads not reached are not applicable: log-prob 0 and entropy 0 (policy §5.1).
        log_prob = {h: -math.log(choices[h]) if h in choices else 0.0 for h in HEADS}
        entropy = {h: math.log(choices[h]) if h in choices else 0.0 for h in HEADS}
        return PolicyDecided(
            epoch=observation.epoch, policy=self.name, policy_id=self.policy_id,
            commands=() if command is None else (command,), action=action, action_index=index,
            legal=legal_summary(table), log_prob=log_prob, log_prob_total=sum(log_prob.values()),
            entropy=entropy, rationale=f"random: uniform over {len(table.ops)} valid ops",
        )

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"kind": self.name, "run_seed": self.run_seed, "env": self.env,
                "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.name:
            raise ValueError(f"not a {self.name} policy state: {state.get('kind')!r}")
        self._check_env(state["env"])
        version, internal, gauss = state["rng"]
        self.run_seed = state["run_seed"]
        self.rng.setstate((version, tuple(internal), gauss))
