"""The valid-action table (policy §3): which (op, slot, blueprint, blend) a controller may emit.

One pure function of the observation serves every consumer: the random policy samples from it,
the heuristic only emits commands found in it, PPO turns it into its masks, and `PolicyDecided`
records its summary. The slot axis is the episode's enabled slots in canonical order; blueprints
keep the policy list's order and blend kinds the configured order, so indices are stable.
"""

import attrs

from esper.compute.observation import Observation
from esper.events.catalogue import PolicyCommand
from esper.events.enums import Stage
from esper.lifecycle.blend import BLEND_KINDS
from esper.lifecycle.stages import CULLABLE, LIVE
from esper.lifecycle.state import SlotState

# The op head's order (policy §5.1): the index of an op is its position here.
OPS = ("wait", "germinate", "advance", "cull", "fossilize")
WAIT, GERMINATE, ADVANCE, CULL, FOSSILIZE = OPS

# Gate number guarding the transition out of each stage that ADVANCE may drive (lifecycle §2.3).
_ADVANCE_GATE = {Stage.GERMINATED: 1, Stage.TRAINING: 2, Stage.BLENDING: 3}


@attrs.frozen
class ActionTable:
    slot_ids: tuple[str, ...]  # the slot head's axis: enabled slots, canonical order
    blueprint_ids: tuple[str, ...]  # the blueprint head's axis: the policy blueprint list
    blend_kinds: tuple[str, ...]  # the blend head's axis
    slots: dict[str, tuple[str, ...]]  # op -> slots where it is valid (wait: none; it takes no slot)
    blueprints: dict[str, tuple[str, ...]]  # germinate-valid slot -> its valid blueprints

    @property
    def ops(self) -> tuple[str, ...]:
        """Valid ops in head order: WAIT always, any other op when some slot allows it."""
        return tuple(op for op in OPS if op == WAIT or self.slots.get(op))

    def is_valid(self, command: PolicyCommand) -> bool:
        if command.slot not in self.slots.get(command.op, ()):
            return False
        if command.op != GERMINATE:
            return True
        kind = command.blend.kind if command.blend is not None else None
        blend_ok = kind is None or kind in self.blend_kinds  # None: the lifecycle default
        return command.blueprint in self.blueprints.get(command.slot, ()) and blend_ok

    # Boolean masks in head order, for samplers.
    def op_mask(self) -> tuple[bool, ...]:
        valid = self.ops
        return tuple(op in valid for op in OPS)

    def slot_mask(self, op: str) -> tuple[bool, ...]:
        valid = self.slots.get(op, ())
        return tuple(s in valid for s in self.slot_ids)

    def blueprint_mask(self, slot: str) -> tuple[bool, ...]:
        valid = self.blueprints.get(slot, ())
        return tuple(b in valid for b in self.blueprint_ids)

    def blend_mask(self) -> tuple[bool, ...]:
        return tuple(True for _ in self.blend_kinds)


def valid_actions(observation: Observation, blend_kinds: tuple[str, ...] = BLEND_KINDS) -> ActionTable:
    """The table of policy §3 for the observed state. `blend_kinds` is `ppo.blend_kinds` (every
    enabled schedule is valid); the observation does not carry it, so callers pass it."""
    config = observation.lifecycle
    state = observation.state
    enabled = tuple(s for s in state.slots if s.enabled)
    live = sum(1 for s in state.slots if s.stage in LIVE)  # fossils included
    budget_ok = config.max_seeds == 0 or live < config.max_seeds
    fits = {
        s.slot_id: tuple(b for b in observation.blueprints if s.slot_id in observation.blueprint_params.get(b, {}))
        for s in enabled
    }
    germinate = tuple(
        s.slot_id for s in enabled
        if s.stage == Stage.DORMANT and budget_ok and fits[s.slot_id] and blend_kinds
    )
    slots = {
        WAIT: (),
        GERMINATE: germinate,
        ADVANCE: tuple(s.slot_id for s in enabled if _advance_valid(s, observation)),
        CULL: tuple(s.slot_id for s in enabled if s.stage in CULLABLE),
        FOSSILIZE: tuple(s.slot_id for s in enabled if s.stage == Stage.PROBATIONARY),
    }
    return ActionTable(
        slot_ids=tuple(s.slot_id for s in enabled),
        blueprint_ids=tuple(observation.blueprints),
        blend_kinds=tuple(blend_kinds),
        slots=slots,
        blueprints={slot: fits[slot] for slot in germinate},
    )


def _advance_valid(slot: SlotState, observation: Observation) -> bool:
    gate = _ADVANCE_GATE.get(slot.stage)
    config = observation.lifecycle
    if gate is None or config.gate_mode(gate) != "explicit":
        return False
    if slot.stage == Stage.TRAINING:
        return slot.epochs_in_stage(observation.epoch) >= config.g2_min_training_epochs
    if slot.stage == Stage.BLENDING:
        return slot.seed.step >= slot.seed.steps_total  # the ramp is complete
    return True  # GERMINATED


def legal_summary(table: ActionTable) -> dict[str, tuple[str, ...]]:
    """`PolicyDecided.legal`: per head the values valid for some choice of the earlier heads
    ("op", "slot", "blueprint", "blend"), plus the conditional masks that make the record
    self-checking: "slot:<op>" per valid non-wait op and "blueprint:<slot>" per germinate slot."""
    ops = table.ops
    any_slot = {s for op in ops for s in table.slots.get(op, ())}
    any_bp = {b for bps in table.blueprints.values() for b in bps}
    legal: dict[str, tuple[str, ...]] = {
        "op": ops,
        "slot": tuple(s for s in table.slot_ids if s in any_slot),
        "blueprint": tuple(b for b in table.blueprint_ids if b in any_bp),
        "blend": table.blend_kinds if GERMINATE in ops else (),
    }
    for op in ops[1:]:
        legal[f"slot:{op}"] = table.slots[op]
    for slot, bps in table.blueprints.items():
        legal[f"blueprint:{slot}"] = bps
    return legal


def head_values(table: ActionTable, command: PolicyCommand | None) -> tuple[dict[str, str | None], dict[str, int]]:
    """`PolicyDecided.action` and `.action_index` for one command (None = wait). Heads the command
    does not reach are not applicable: value None, stored index 0 (policy §5.1). A germinate
    without an explicit blend records the lifecycle default as None too: no blend head chose it."""
    action: dict[str, str | None] = {"op": WAIT, "slot": None, "blueprint": None, "blend": None}
    index = {"op": 0, "slot": 0, "blueprint": 0, "blend": 0}
    if command is None:
        return action, index
    action["op"], index["op"] = command.op, OPS.index(command.op)
    action["slot"], index["slot"] = command.slot, table.slot_ids.index(command.slot)
    if command.op == GERMINATE:
        action["blueprint"], index["blueprint"] = command.blueprint, table.blueprint_ids.index(command.blueprint)
        if command.blend is not None:
            action["blend"], index["blend"] = command.blend.kind, table.blend_kinds.index(command.blend.kind)
    return action, index
