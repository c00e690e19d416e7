"""Mutable mirrors of the decider state, for folding long logs.

`evolve` rebuilds a SeedState, a SlotState, an EnvState and a RunState for nearly every record;
on a replay that is most of the time. These mirrors carry the same fields (taken from the attrs
classes, so the two cannot drift apart) and are changed in place; `thaw` and `freeze` convert
between the two forms, and a frozen mirror equals the state it was thawed from.
"""

from typing import Any

import attrs

from esper.lifecycle.state import Counterfactual, EnvState, RunState, SeedState, SlotState


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in attrs.fields(cls))


_NAMES = {cls: _names(cls) for cls in (SeedState, SlotState, EnvState, RunState)}


# Counterfactual samples are kept as (value, epoch, alpha) tuples: most are replaced by the next
# epoch's before anyone looks, and a tuple costs a tenth of a frozen instance.
_SAMPLES = ("last_counterfactual", "last_shadow")


class ThawedSeed:
    __slots__ = _names(SeedState)

    def freeze(self) -> SeedState:
        values = {name: getattr(self, name) for name in self.__slots__}
        for name in _SAMPLES:
            if values[name] is not None:
                values[name] = Counterfactual(*values[name])
        return SeedState(**values)


class ThawedSlot:
    __slots__ = _names(SlotState)  # `seed` holds a ThawedSeed

    def freeze(self) -> SlotState:
        values = {name: getattr(self, name) for name in self.__slots__}
        values["seed"] = None if self.seed is None else self.seed.freeze()
        return SlotState(**values)


class ThawedEnv:
    # `slots` is a list in canonical order; `decisions` a list; `by_id` finds a slot by its id.
    __slots__ = _names(EnvState) + ("by_id",)

    def freeze(self) -> EnvState:
        values = {name: getattr(self, name) for name in _NAMES[EnvState]}
        values["slots"] = tuple(slot.freeze() for slot in self.slots)
        values["decisions"] = tuple(self.decisions)
        return EnvState(**values)


class ThawedRun:
    __slots__ = _names(RunState)  # `envs` maps env ids to ThawedEnv

    def freeze(self) -> RunState:
        values = {name: getattr(self, name) for name in self.__slots__}
        values["envs"] = {env: state.freeze() for env, state in self.envs.items()}
        return RunState(**values)


def _copy(target: Any, source: Any) -> Any:
    for name in _NAMES[type(source)]:
        setattr(target, name, getattr(source, name))
    return target


# SeedState has no validators or converters, so its defaults plus the given fields are what its
# constructor would hold.
_SEED_DEFAULTS = {f.name: f.default for f in attrs.fields(SeedState) if f.default is not attrs.NOTHING}


def new_seed(**fields: Any) -> ThawedSeed:
    """`thaw_seed(SeedState(**fields))`, without building the frozen seed first."""
    seed = ThawedSeed()
    for name, value in (_SEED_DEFAULTS | fields).items():
        setattr(seed, name, value)
    return seed


def thaw_seed(seed: SeedState) -> ThawedSeed:
    thawed = _copy(ThawedSeed(), seed)
    for name in _SAMPLES:
        sample = getattr(seed, name)
        if sample is not None:
            setattr(thawed, name, (sample.value, sample.epoch, sample.alpha))
    return thawed


def thaw_env(env: EnvState) -> ThawedEnv:
    thawed = _copy(ThawedEnv(), env)
    # evolve replaces every slot of an id at once, so slots that share an id are always equal:
    # here they share one mirror, which each change reaches once.
    thawed.by_id = {}
    for slot in env.slots:
        if slot.slot_id not in thawed.by_id:
            mirror = thawed.by_id[slot.slot_id] = _copy(ThawedSlot(), slot)
            mirror.seed = None if slot.seed is None else thaw_seed(slot.seed)
    thawed.slots = [thawed.by_id[slot.slot_id] for slot in env.slots]
    thawed.decisions = list(env.decisions)
    return thawed


def thaw(state: RunState) -> ThawedRun:
    thawed = _copy(ThawedRun(), state)
    thawed.envs = {env: thaw_env(env_state) for env, env_state in state.envs.items()}
    return thawed
