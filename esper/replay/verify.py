"""`esper replay --verify` (events §7): every invariant of the lifecycle on every prefix, in O(n).

Each record is checked against the state folded from the records before it, then folded. Four
families of checks:

- framing: dense seq from 0, one run id, `RunStarted` first and only once, nothing after
  `RunFinished`, run-scoped events without env/episode and env-scoped ones with them, one env and
  episode per batch (the reader already enforces CRCs and the header);
- legality: `StageChanged.from_stage` is the folded stage and the pair is a valid transition;
  FOSSILIZED never changes; every gated transition follows a passing verdict of its gate in its
  batch; alpha lies in [0, 1] and matches the stage; at most one live seed per slot; the embargo
  and reset pipeline keeps the configured durations; epochs are dense per env-episode;
  `SeedCulled`/`SeedFossilized` are paired with their `StageChanged`; a counterfactual's
  `real_acc` is the epoch's `val_acc`; a decision's commands follow it, in order;
  `state_digest` equals the folded state's;
- re-decision: the command behind each batch is rebuilt from the batch and `decide` on the
  prefix state must give the recorded payloads back (logic drift otherwise);
- projections: the live read models agree with the folded state at every batch end, and equal a
  rebuild from scratch at sampled batch ends (1, 2, 4, 8, … and the last: O(n) in total).

The first violation stops the check. A missing `RunFinished` is a warning; logic drift in a log
written by another esper version is a warning unless `strict`.
"""

import math
from typing import Any, Iterable

import attrs

from esper import __version__
from esper.events import catalogue as ev
from esper.events.catalogue import RUN_SCOPED
from esper.events.enums import Stage
from esper.events.envelope import SCHEMA_VERSION, Record
from esper.lifecycle.decide import decide, state_digest
from esper.lifecycle.errors import DomainError, ReplayError
from esper.lifecycle.evolve import evolve
from esper.lifecycle.projections import Projector
from esper.lifecycle.stages import LIVE, TRANSITIONS, gate_for_target, target_of_gate
from esper.lifecycle.state import EnvState, RunState, SlotState, initial_state
from esper.replay.redecide import NoCommand, as_stored, first_difference, lifecycle_command, redecide

INVARIANTS = (
    "framing", "dense_epochs", "stage_matches_fold", "valid_transition", "fossilized_terminal", "gated_transition",
    "alpha_range", "alpha_matches_stage", "one_live_seed", "embargo_countdown", "outcome_paired",
    "counterfactual_real_acc", "decision_commands", "state_digest", "fold", "redecide", "projections",
)

_GATED = frozenset({Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY, Stage.FOSSILIZED})
_ZERO_ALPHA = frozenset({Stage.GERMINATED, Stage.TRAINING, Stage.CULLED, Stage.EMBARGOED, Stage.RESETTING})
_FULL_ALPHA = frozenset({Stage.PROBATIONARY, Stage.FOSSILIZED})


@attrs.frozen
class Violation:
    seq: int
    invariant: str
    expected: str
    actual: str
    offset: int | None = None

    def describe(self) -> str:
        where = f"seq {self.seq}" + ("" if self.offset is None else f" (offset {self.offset})")
        return f"violation at {where}: {self.invariant}: expected {self.expected}, actual {self.actual}"


@attrs.frozen
class VerifyReport:
    records: int
    checks: int
    violation: Violation | None
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.violation is None

    def describe(self) -> str:
        if self.violation is None:
            return f"OK: {self.records} records, {self.checks} checks"
        return self.violation.describe()


class _Found(Exception):
    def __init__(self, violation: Violation):
        self.violation = violation


def verify_records(records: Iterable[Record], strict: bool = False) -> VerifyReport:
    """Check every record of a log, in order; records need only be complete batches."""
    verifier = Verifier(strict=strict)
    try:
        for record in records:
            verifier.feed(record)
        verifier.finish()
    except _Found as found:
        return VerifyReport(verifier.count, verifier.checks, found.violation, tuple(verifier.warnings))
    return VerifyReport(verifier.count, verifier.checks, None, tuple(verifier.warnings))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


class Verifier:
    def __init__(self, strict: bool = False):
        self.strict = strict
        self.state: RunState = initial_state()
        self.projector = Projector()
        self.records: list[Record] = []  # kept for the sampled projection rebuilds
        self.batch: list[Record] = []
        self.count = 0
        self.checks = 0
        self.warnings: list[str] = []
        self.run_id: str | None = None
        self.version: str | None = None
        self.finished = False
        self.batches = 0
        self.next_rebuild = 1
        self.rebuilt_at: int | None = None
        self.expected_seq = 0
        self.pending: dict[int, tuple[int, list[ev.PolicyCommand]]] = {}  # env -> (decision epoch, commands)
        self.seed_ids: dict[tuple[int, int], set[str]] = {}

    # -- the stream ---------------------------------------------------------------------------

    def feed(self, record: Record) -> None:
        self.count += 1
        self.records.append(record)
        self.batch.append(record)
        if record.batch_end:
            batch, self.batch = self.batch, []
            self._batch(batch)

    def finish(self) -> None:
        if self.batch:
            self._fail(self.batch[-1].seq, "framing", "batch_end on the last record of a batch",
                       "the log ends inside a batch")
        if self.records and self.rebuilt_at != self.records[-1].seq:  # the final rebuild
            self._rebuild(self.records[-1].seq)
        if self.count == 0:
            self._fail(0, "framing", "RunStarted at seq 0", "an empty log")
        if not self.finished:
            self.warnings.append("the log has no RunFinished (the run is unterminated or still running)")

    def _check(self, ok: bool, seq: int, invariant: str, expected: Any, actual: Any) -> None:
        self.checks += 1
        if not ok:
            self._fail(seq, invariant, expected, actual)

    def _fail(self, seq: int, invariant: str, expected: Any, actual: Any) -> None:
        raise _Found(Violation(seq=seq, invariant=invariant, expected=str(expected), actual=str(actual)))

    # -- one batch ----------------------------------------------------------------------------

    def _batch(self, batch: list[Record]) -> None:
        before = self.state
        # Legality first: its violation is reported before any drift of the same batch, since the
        # drift is its consequence.
        for record in batch:
            self._record(record, batch)
        self._end_of_batch(batch)
        drift = self._redecide(batch, before)
        if drift is not None:
            raise _Found(drift)
        self.batches += 1
        if self.batches == self.next_rebuild:
            self._rebuild(batch[-1].seq)
            self.next_rebuild *= 2

    def _record(self, record: Record, batch: list[Record]) -> None:
        self._framing(record)
        head = batch[0]
        self._check((record.env, record.episode) == (head.env, head.episode), record.seq, "framing",
                    f"env {head.env} episode {head.episode}, as the rest of its batch",
                    f"env {record.env} episode {record.episode}")
        event = record.event
        seq = record.seq
        if record.env is not None and not isinstance(event, ev.EpisodeStarted):
            env = self.state.envs.get(record.env)
            self._check(env is not None and env.episode == record.episode, seq, "framing",
                        f"a started episode of env {record.env}", f"episode {record.episode}")
            self._epochs(record, env, batch)
            self._lifecycle(record, env, batch)
        elif isinstance(event, ev.EpisodeStarted):
            self._episode_started(record)
        try:
            self.state = evolve(self.state, record)
        except ReplayError as exc:
            self._fail(seq, "fold", "a record evolve can apply", exc.reason)
        self.projector.apply(record)
        if isinstance(event, ev.RunFinished):
            self.finished = True

    def _framing(self, record: Record) -> None:
        seq, event = record.seq, record.event
        expected, self.expected_seq = self.expected_seq, self.expected_seq + 1
        self._check(seq == expected, seq, "framing", f"seq {expected}", f"seq {seq}")
        if expected == 0:
            self._check(isinstance(event, ev.RunStarted), seq, "framing", "RunStarted first", type(event).__name__)
            self.run_id, self.version = record.run_id, event.esper_version
        else:
            self._check(record.run_id == self.run_id, seq, "framing", f"run_id {self.run_id!r}",
                        f"run_id {record.run_id!r}")
            self._check(not isinstance(event, ev.RunStarted), seq, "framing", "one RunStarted", "a second one")
        self._check(not self.finished, seq, "framing", "nothing after RunFinished", type(event).__name__)
        self._check(record.schema <= SCHEMA_VERSION, seq, "framing", f"schema <= {SCHEMA_VERSION}",
                    f"schema {record.schema}")
        run_scoped = type(event) in RUN_SCOPED
        self._check((record.env is None and record.episode is None) == run_scoped, seq, "framing",
                    "no env/episode" if run_scoped else "an env and an episode",
                    f"env {record.env} episode {record.episode} on {type(event).__name__}")

    def _episode_started(self, record: Record) -> None:
        seq, env = record.seq, self.state.envs.get(record.env)
        self._check(0 <= record.env < self.state.n_envs, seq, "framing", f"env in 0..{self.state.n_envs - 1}",
                    record.env)
        expected = 0 if env is None else env.episode + 1
        self._check(record.episode == expected, seq, "dense_epochs", f"episode {expected}",
                    f"episode {record.episode}")
        self._check(env is None or env.status == "finished", seq, "dense_epochs",
                    "the previous episode finished", "it is still running")
        self._check(record.event.epoch == 0, seq, "dense_epochs", "epoch 0", f"epoch {record.event.epoch}")
        self.pending.pop(record.env, None)

    # -- epochs -------------------------------------------------------------------------------

    def _epochs(self, record: Record, env: EnvState, batch: list[Record]) -> None:
        seq, event = record.seq, record.event
        epoch = event.epoch
        if isinstance(event, ev.EpochCompleted):
            self._check(env.ticked and epoch == env.epoch + 1, seq, "dense_epochs",
                        f"epoch {env.epoch + 1} after a ticked epoch {env.epoch}",
                        f"epoch {epoch}{'' if env.ticked else f' before epoch {env.epoch} was ticked'}")
            self._check(env.max_epochs == 0 or epoch <= env.max_epochs, seq, "dense_epochs",
                        f"epoch <= max_epochs {env.max_epochs}", f"epoch {epoch}")
        elif isinstance(event, ev.EpochTicked):
            self._check(not env.ticked and epoch == env.epoch, seq, "dense_epochs",
                        f"one tick of epoch {env.epoch}", f"a tick of epoch {epoch}"
                        + (" (already ticked)" if env.ticked else ""))
        elif isinstance(batch[-1].event, ev.GovernorRolledBack):  # precedes RecordEpoch(epoch)
            self._check(env.ticked and epoch == env.epoch + 1, seq, "dense_epochs",
                        f"epoch {env.epoch + 1} (the epoch being trained)", f"epoch {epoch}")
        elif isinstance(event, ev.EpisodeFinished):
            self._check(epoch == env.epoch and event.epochs == env.epoch, seq, "dense_epochs",
                        f"epoch {env.epoch}", f"epoch {epoch}, epochs {event.epochs}")
        elif isinstance(event, ev.EpisodeExtended):  # an episode only grows, from its folded length
            self._check(epoch == env.epoch and event.previous_max_epochs == env.max_epochs < event.max_epochs, seq,
                        "dense_epochs", f"epoch {env.epoch}, max_epochs from {env.max_epochs} to more",
                        f"epoch {epoch}, max_epochs from {event.previous_max_epochs} to {event.max_epochs}")
        else:
            self._check(epoch == env.epoch, seq, "dense_epochs", f"epoch {env.epoch}", f"epoch {epoch}")

    # -- lifecycle legality -------------------------------------------------------------------

    def _lifecycle(self, record: Record, env: EnvState, batch: list[Record]) -> None:
        event, seq = record.event, record.seq
        if isinstance(event, ev.StageChanged):
            self._stage_changed(record, env, batch)
        elif isinstance(event, ev.SeedGerminated):
            slot = env.slot(event.slot)
            self._check(slot is not None and slot.stage == Stage.DORMANT and slot.seed is None, seq,
                        "one_live_seed", f"slot {event.slot} DORMANT and empty",
                        f"{slot.stage.name} holding {slot.seed.seed_id if slot and slot.seed else None}"
                        if slot else "no such slot")
            known = self.seed_ids.setdefault((record.env, record.episode), set())
            self._check(event.seed_id not in known, seq, "one_live_seed", "a new seed id",
                        f"{event.seed_id} again")
            known.add(event.seed_id)
            limit = self.state.config.max_seeds
            self._check(not limit or env.live_seeds() < limit, seq, "one_live_seed",
                        f"fewer than max_seeds {limit} live seeds", env.live_seeds())
        elif isinstance(event, ev.GateEvaluated):
            self._check(event.target_stage == target_of_gate(event.gate), seq, "gated_transition",
                        f"{event.gate.name} targets {target_of_gate(event.gate).name}", event.target_stage.name)
        elif isinstance(event, ev.AlphaChanged):
            slot = self._seed_slot(record, env)
            self._check(slot.stage != Stage.FOSSILIZED, seq, "fossilized_terminal",
                        f"{event.seed_id} FOSSILIZED unchanged", f"alpha {event.old} -> {event.new}")
            self._check(0.0 <= event.new <= 1.0 and 0.0 <= event.old <= 1.0, seq, "alpha_range",
                        "alpha within [0, 1]", f"{event.old} -> {event.new}")
            self._check(_same(event.old, slot.seed.alpha), seq, "alpha_matches_stage",
                        f"old alpha {slot.seed.alpha} (the folded one)", event.old)
        elif isinstance(event, ev.SeedCulled):
            slot = self._seed_slot(record, env)
            change = self._preceding_change(batch, record, Stage.CULLED)
            self._check(change is not None, seq, "outcome_paired", f"StageChanged(->CULLED) of {event.seed_id} "
                        "earlier in its batch", "none")
            self._check(change.from_stage == event.stage_at_cull, seq, "outcome_paired",
                        f"stage_at_cull {change.from_stage.name}", event.stage_at_cull.name)
        elif isinstance(event, ev.SeedFossilized):
            self._seed_slot(record, env)
            change = self._preceding_change(batch, record, Stage.FOSSILIZED)
            self._check(change is not None, seq, "outcome_paired",
                        f"StageChanged(->FOSSILIZED) of {event.seed_id} earlier in its batch", "none")
        elif isinstance(event, ev.CounterfactualMeasured):
            self._seed_slot(record, env)
            metrics = batch[0].event
            expected = metrics.val_acc if isinstance(metrics, ev.EpochCompleted) else "an EpochCompleted first"
            self._check(isinstance(metrics, ev.EpochCompleted) and _same(event.real_acc, metrics.val_acc), seq,
                        "counterfactual_real_acc", f"real_acc {expected}", event.real_acc)
        elif isinstance(event, ev.SeedMeasured):
            slot = self._seed_slot(record, env)
            self._check(slot.stage == event.stage, seq, "stage_matches_fold", slot.stage.name, event.stage.name)
        self._decisions(record, batch)

    def _seed_slot(self, record: Record, env: EnvState) -> SlotState:
        event = record.event
        slot = env.slot(event.slot)
        held = slot.seed.seed_id if slot is not None and slot.seed is not None else None
        self._check(held == event.seed_id, record.seq, "stage_matches_fold",
                    f"slot {event.slot} holding {event.seed_id}", f"it holds {held}")
        return slot

    @staticmethod
    def _preceding_change(batch: list[Record], record: Record, stage: Stage) -> ev.StageChanged | None:
        for other in batch:
            if other is record:
                break
            e = other.event
            if isinstance(e, ev.StageChanged) and e.to_stage == stage and e.seed_id == record.event.seed_id:
                return e
        return None

    def _stage_changed(self, record: Record, env: EnvState, batch: list[Record]) -> None:
        event, seq = record.event, record.seq
        slot = self._seed_slot(record, env)
        self._check(slot.stage != Stage.FOSSILIZED, seq, "fossilized_terminal",
                    f"{event.seed_id} FOSSILIZED for good", f"{event.from_stage.name} -> {event.to_stage.name}")
        self._check(event.from_stage == slot.stage, seq, "stage_matches_fold",
                    f"from_stage {slot.stage.name} (folded)", f"from_stage {event.from_stage.name}")
        self._check(event.to_stage in TRANSITIONS.get(event.from_stage, ()), seq, "valid_transition",
                    "a pair of the transition table", f"{event.from_stage.name} -> {event.to_stage.name}")
        if event.to_stage in _GATED:
            gate = gate_for_target(event.to_stage)
            verdict = any(
                isinstance(o.event, ev.GateEvaluated) and o.event.seed_id == event.seed_id
                and o.event.gate == gate and o.event.passed
                for o in batch[:batch.index(record)]
            )
            self._check(verdict, seq, "gated_transition", f"a passing {gate.name} verdict earlier in the batch",
                        "none")
        in_stage = event.epoch - slot.entered_epoch
        config = self.state.config
        if event.from_stage == Stage.EMBARGOED:
            self._check(in_stage == config.embargo_epochs, seq, "embargo_countdown",
                        f"{config.embargo_epochs} epochs EMBARGOED", f"{in_stage}")
        elif event.from_stage == Stage.RESETTING:
            self._check(in_stage == config.resetting_epochs, seq, "embargo_countdown",
                        f"{config.resetting_epochs} epochs RESETTING", f"{in_stage}")
        elif event.from_stage == Stage.CULLED:
            self._check(in_stage in (0, 1), seq, "embargo_countdown", "EMBARGOED at the first tick after the cull",
                        f"{in_stage} epochs later")

    def _countdown(self, record: Record, env: EnvState, batch: list[Record]) -> None:
        """At the end of a tick no slot may be overdue in the cull-embargo-reset pipeline."""
        config, epoch = self.state.config, record.event.epoch
        culled_now = {o.event.slot for o in batch if isinstance(o.event, ev.StageChanged)
                      and o.event.to_stage == Stage.CULLED}
        for slot in env.slots:
            in_stage = slot.epochs_in_stage(epoch)
            if slot.stage == Stage.CULLED:
                self._check(slot.slot_id in culled_now, record.seq, "embargo_countdown",
                            f"{slot.slot_id} EMBARGOED by the tick after its cull", "still CULLED")
            elif slot.stage == Stage.EMBARGOED:
                self._check(in_stage < config.embargo_epochs, record.seq, "embargo_countdown",
                            f"{slot.slot_id} RESETTING after {config.embargo_epochs} epochs",
                            f"EMBARGOED for {in_stage}")
            elif slot.stage == Stage.RESETTING:
                self._check(in_stage < config.resetting_epochs, record.seq, "embargo_countdown",
                            f"{slot.slot_id} DORMANT after {config.resetting_epochs} epochs",
                            f"RESETTING for {in_stage}")

    def _end_of_batch(self, batch: list[Record]) -> None:
        last = batch[-1]
        if last.env is None:
            return
        env = self.state.envs.get(last.env)
        touched: dict[str, int] = {}
        for record in batch:
            e = record.event
            if isinstance(e, ev.StageChanged) and e.to_stage in (Stage.CULLED, Stage.FOSSILIZED):
                outcome = ev.SeedCulled if e.to_stage == Stage.CULLED else ev.SeedFossilized
                paired = any(isinstance(o.event, outcome) and o.event.seed_id == e.seed_id for o in batch)
                self._check(paired, record.seq, "outcome_paired", f"{outcome.__name__} of {e.seed_id} in the batch",
                            "none")
            if isinstance(e, (ev.StageChanged, ev.AlphaChanged)):
                touched[e.slot] = record.seq
        for slot in env.slots if env is not None else ():
            if slot.seed is None or slot.stage not in LIVE | _ZERO_ALPHA:
                continue
            alpha, stage = slot.seed.alpha, slot.stage
            ok = (alpha == 0.0 if stage in _ZERO_ALPHA else alpha == 1.0 if stage in _FULL_ALPHA
                  else 0.0 < alpha <= 1.0)
            want = "0" if stage in _ZERO_ALPHA else "1" if stage in _FULL_ALPHA else "within (0, 1]"
            self._check(ok, touched.get(slot.slot_id, last.seq), "alpha_matches_stage",
                        f"alpha {want} in {stage.name}", f"{alpha} ({slot.seed.seed_id})")
        # Checks of the batch's last record (an EpochTicked or EpisodeFinished) come after those of
        # the records before it, so the first violation is the one with the lowest seq.
        if isinstance(last.event, ev.EpochTicked):
            self._countdown(last, env, batch)
        if isinstance(last.event, (ev.EpochTicked, ev.EpisodeFinished)):
            folded = state_digest(env)
            self._check(folded == last.event.state_digest, last.seq, "state_digest", folded,
                        last.event.state_digest)
        self._slot_views(last.seq, last.env)

    # -- decisions and their commands ---------------------------------------------------------

    def _decisions(self, record: Record, batch: list[Record]) -> None:
        """A decision's commands follow it, in order (each carried out or rejected), before any other
        batch of its env."""
        if record is not batch[0]:
            return
        event, env = record.event, record.env
        pending = self.pending.get(env)
        op, slot, decision_epoch = _command_shape(batch)
        if op is not None:
            head = pending[1][0] if pending and pending[1] else None
            matches = head is not None and head.op == op and head.slot == slot and (
                decision_epoch is None or decision_epoch == pending[0])
            if isinstance(event, ev.ActionRejected):
                matches = matches and head == event.command
            if matches:
                pending[1].pop(0)
                return
            self._check(decision_epoch is None and not isinstance(event, ev.ActionRejected), record.seq,
                        "decision_commands",
                        f"the decision's next command {_show(head)}" if head else "no command of a decision",
                        f"{op} {slot} (decision epoch {decision_epoch})")
            return
        if pending and pending[1]:
            self._check(False, record.seq, "decision_commands",
                        f"the decision of epoch {pending[0]}'s commands {', '.join(map(_show, pending[1]))}",
                        type(event).__name__)
        if isinstance(event, ev.PolicyDecided):
            self.pending[env] = (event.epoch, list(event.commands))

    # -- re-decision --------------------------------------------------------------------------

    def _redecide(self, batch: list[Record], before: RunState) -> Violation | None:
        self.checks += 1
        try:
            events = redecide(batch, before)
        except NoCommand as exc:
            return Violation(batch[0].seq, "redecide", "a batch some command produces", str(exc))
        except DomainError as exc:
            return Violation(batch[0].seq, "redecide", f"the decider to accept the command behind the batch",
                             f"{exc.code}: {exc.message}")
        index = first_difference(batch, events)
        if index is None:
            return self._rejection(batch, before)
        record = batch[index]
        expected = as_stored(events[index]) if index < len(events) else None
        violation = Violation(record.seq, "redecide", _payload(expected), _payload(record.event))
        if self.version != __version__ and not self.strict:
            self.warnings.append(f"logic drift at seq {record.seq} (the log was written by esper {self.version}, "
                                 f"this is {__version__}): {violation.describe()}")
            return None
        return violation

    def _rejection(self, batch: list[Record], before: RunState) -> Violation | None:
        """An ActionRejected must be what the decider still says about that command."""
        event = batch[0].event
        if not isinstance(event, ev.ActionRejected):
            return None
        self.checks += 1
        try:
            decide(lifecycle_command(batch[0].env, event.decision_epoch, event.command), before)
        except DomainError as exc:
            if exc.code == event.code:
                return None
            return Violation(batch[0].seq, "redecide", f"rejection {exc.code}", f"rejection {event.code}")
        return Violation(batch[0].seq, "redecide", "the command accepted", f"rejection {event.code}")

    # -- projections --------------------------------------------------------------------------

    def _slot_views(self, seq: int, env_id: int) -> None:
        env = self.state.envs.get(env_id)
        if env is None:
            return
        # The live views, read without a full snapshot (which would copy every curve each batch).
        views = getattr(self.projector, "_slots", None)
        if views is None:
            return
        for slot in env.slots:
            if not slot.enabled:
                continue
            view = views.get((env_id, slot.slot_id))
            seed = slot.seed.seed_id if slot.seed is not None and slot.stage != Stage.DORMANT else None
            alpha = slot.seed.alpha if slot.seed is not None else 0.0
            actual = None if view is None else (view.stage.name, view.current_seed, view.alpha)
            self._check(view is not None and (view.stage, view.current_seed) == (slot.stage, seed)
                        and _same(view.alpha, alpha), seq, "projections",
                        f"SlotView {slot.slot_id} = {(slot.stage.name, seed, alpha)} (folded)", actual)

    def _rebuild(self, seq: int) -> None:
        self.checks += 1
        self.rebuilt_at = seq
        projector = Projector()
        for record in self.records[:seq + 1]:
            projector.apply(record)
        rebuilt, live = projector.snapshot(), self.projector.snapshot()
        if rebuilt != live and repr(rebuilt) != repr(live):  # repr: NaN losses equal themselves
            self._fail(seq, "projections", "projections rebuilt from scratch", "different incremental ones")


def _command_shape(batch: list[Record]) -> tuple[str | None, str | None, int | None]:
    """(op, slot, decision epoch) of a controller command's batch; (None, None, None) otherwise."""
    first = batch[0].event
    if isinstance(first, ev.ActionRejected):
        return first.command.op, first.command.slot, first.decision_epoch
    if isinstance(first, ev.GateEvaluated) and first.trigger == "command":
        outcome = next((r.event for r in batch if isinstance(r.event, (ev.SeedGerminated, ev.SeedFossilized))),
                       None)
        op = {0: "germinate", 5: "fossilize"}.get(int(first.gate), "advance")
        return op, first.slot, getattr(outcome, "decision_epoch", None)
    if isinstance(first, ev.StageChanged) and first.trigger == "command" and first.to_stage == Stage.CULLED:
        culled = next((r.event for r in batch if isinstance(r.event, ev.SeedCulled)), None)
        return "cull", first.slot, culled.decision_epoch if culled else None
    return None, None, None


def _show(command: ev.PolicyCommand | None) -> str:
    if command is None:
        return "none"
    return f"{command.op} {command.slot}" + (f" {command.blueprint}" if command.blueprint else "")


def _payload(event: ev.Event | None) -> str:
    if event is None:
        return "no record"
    import msgspec

    return msgspec.json.encode(event).decode()


def verify_log(path: Any, strict: bool = False) -> VerifyReport:
    """Verify a log file or run directory; the reader's own errors (`LogError`, unknown event
    types) propagate. A violation carries its byte offset."""
    from esper.replay.timetravel import load

    loaded = load(path)
    report = verify_records(loaded.records, strict=strict)
    if report.violation is not None:
        report = attrs.evolve(report, violation=attrs.evolve(report.violation,
                                                              offset=frame_offset(loaded.path, report.violation.seq)))
    if loaded.summary.tail == "torn":
        report = attrs.evolve(report, warnings=report.warnings + (
            f"torn tail at offset {loaded.summary.torn_offset} ({loaded.summary.torn_bytes} bytes) not verified",))
    return report


def frame_offset(path: Any, seq: int) -> int | None:
    """Byte offset of record `seq`'s frame, by walking the frame heads."""
    from esper.events.log_format import FRAME_HEAD, FRAME_HEAD_SIZE, HEADER_SIZE

    offset = HEADER_SIZE
    try:
        with open(path, "rb") as f:
            f.seek(HEADER_SIZE)
            for _ in range(seq):
                head = f.read(FRAME_HEAD_SIZE)
                if len(head) < FRAME_HEAD_SIZE:
                    return None
                length, _ = FRAME_HEAD.unpack(head)
                f.seek(length, 1)
                offset += FRAME_HEAD_SIZE + length
    except OSError:
        return None
    return offset
