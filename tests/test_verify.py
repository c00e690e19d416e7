"""`esper replay --verify` (events §7): passes on real logs, and names the first violation of each
invariant in a log written to break exactly that invariant."""

import msgspec
import pytest
from click.testing import CliRunner

from esper import __version__
from esper.cli.main import cli
from esper.events import catalogue as ev
from esper.events.enums import Stage
from esper.events.log import LogWriter
from esper.lifecycle import commands as cmd
from esper.replay.verify import verify_log, verify_records
from support import Ledger, epoch_metrics, probe, run_started

LIFECYCLE = {"embargo_epochs": 2, "resetting_epochs": 1}
MAX_EPOCHS = 14


def _decision(epoch: int, *commands: ev.PolicyCommand) -> ev.PolicyDecided:
    return ev.PolicyDecided(epoch=epoch, policy="heuristic", policy_id="test", commands=commands, action={},
                            action_index={}, legal={}, rationale="scripted")


def _measure(ledger: Ledger, slot_id: str, acc: float) -> cmd.SlotMeasurement:
    slot = ledger.state.envs[0].slot(slot_id)
    if slot.stage == Stage.TRAINING:
        cf = cmd.CounterfactualSample(kind="shadow", alpha=1.0, real_acc=acc, ablated_acc=acc + 2.0, real_loss=1.0,
                                      ablated_loss=0.9, n=10)
    else:
        cf = cmd.CounterfactualSample(kind="ablation", alpha=0.0, real_acc=acc, ablated_acc=acc - 2.0, real_loss=1.0,
                                      ablated_loss=1.2, n=10)
    return cmd.SlotMeasurement(slot=slot_id, seed_id=slot.seed.seed_id, grad_ratio=0.5, seed_grad_norm=0.1,
                               host_grad_norm=0.2, isolation_leaks=0, finite=True, vanishing=False, exploding=False,
                               counterfactual=cf)


def story(episodes: int = 1) -> list:
    """A seed in `mid` germinated, trained, blended, put on probation and fossilized; a seed in
    `late` germinated, culled by the policy, embargoed, reset and released; one rejected command.
    (`episodes` repeats the episode, for timing the verifier on long logs.)"""
    ledger = Ledger()
    header = msgspec.structs.replace(run_started(LIFECYCLE), esper_version=__version__)
    ledger.execute(cmd.StartRun(run=header))
    for _ in range(episodes):
        _episode(ledger)
    ledger.execute(cmd.FinishRun(status="completed", final={"val_acc": 64.0}))
    return ledger.records


def _episode(ledger: Ledger) -> None:
    ledger.execute(cmd.StartEpisode(episode_seed=1, host_seed=1, host_params=320, slots_enabled=("mid", "late"),
                                    max_epochs=MAX_EPOCHS))
    plan = {
        1: [ev.PolicyCommand(op="germinate", slot="mid", blueprint="conv_light")],
        9: [ev.PolicyCommand(op="fossilize", slot="mid"),
            ev.PolicyCommand(op="germinate", slot="late", blueprint="norm")],
        10: [ev.PolicyCommand(op="cull", slot="late", reason="scripted")],
        11: [ev.PolicyCommand(op="germinate", slot="late", blueprint="norm")],  # EMBARGOED: refused
    }
    for epoch in range(1, MAX_EPOCHS + 1):
        acc = 50.0 + epoch
        active = [s.slot_id for s in ledger.state.envs[0].slots if s.active]
        ledger.execute(cmd.RecordEpoch(epoch=epoch, metrics=epoch_metrics(epoch, val_acc=acc),
                                       measurements=tuple(_measure(ledger, s, acc) for s in active)))
        if epoch == MAX_EPOCHS:
            ledger.execute(cmd.FinishEpisode())
            return
        commands = plan.get(epoch, [])
        ledger.execute(cmd.RecordDecision(decision=_decision(epoch, *commands)))
        for c in commands:
            if c.op == "germinate":
                command = cmd.Germinate(slot=c.slot, blueprint=c.blueprint, probe=probe(c.blueprint, c.slot),
                                        decision_epoch=epoch)
            elif c.op == "fossilize":
                command = cmd.Fossilize(slot=c.slot, decision_epoch=epoch)
            else:
                command = cmd.Cull(slot=c.slot, reason=c.reason, initiator="policy", decision_epoch=epoch)
            try:
                ledger.execute(command)
            except Exception as exc:
                ledger.execute(cmd.RejectAction(decision_epoch=epoch, command=c, code=exc.code, message=exc.message))
        ledger.execute(cmd.Tick(epoch=epoch))


@pytest.fixture(scope="module")
def records() -> list:
    return story()


def write(path, records) -> None:
    """Write records as batches (the writer stamps seqs afresh, so dropping a record is allowed)."""
    with LogWriter.create(path, fsync="never") as writer:
        batch = []
        for record in records:
            batch.append(record)
            if record.batch_end:
                writer.append_batch("story", batch[0].env, batch[0].episode, [r.event for r in batch])
                batch = []


def find(records, type_, **fields) -> int:
    """The index (= seq) of the first record of type `type_` whose payload has `fields`."""
    for i, record in enumerate(records):
        if isinstance(record.event, type_) and all(getattr(record.event, k) == v for k, v in fields.items()):
            return i
    raise LookupError(f"no {type_.__name__} with {fields}")


def tamper(records, index, **changes) -> list:
    records = list(records)
    records[index] = msgspec.structs.replace(records[index], event=msgspec.structs.replace(records[index].event,
                                                                                           **changes))
    return records


def drop(records, index) -> list:
    """Remove one record; when it closed its batch, the record before it closes the batch instead."""
    records = list(records)
    removed = records.pop(index)
    if removed.batch_end:
        records[index - 1] = msgspec.structs.replace(records[index - 1], batch_end=True)
    return records


def violation(tmp_path, records):
    path = tmp_path / f"v{len(list(tmp_path.iterdir()))}.elog"
    write(path, records)
    report = verify_log(path)
    assert report.violation is not None, report.describe()
    return report.violation


def test_the_story_covers_every_stage(records):
    stages = {r.event.to_stage for r in records if isinstance(r.event, ev.StageChanged)}
    assert stages == set(Stage) - {Stage.UNKNOWN}
    assert any(isinstance(r.event, ev.ActionRejected) for r in records)


def test_a_clean_log_verifies(tmp_path, records):
    path = tmp_path / "events.elog"
    write(path, records)
    report = verify_log(path)
    assert report.ok, report.describe()
    assert report.records == len(records) and report.checks > len(records)
    assert report.describe() == f"OK: {len(records)} records, {report.checks} checks"
    assert report.warnings == ()


def test_a_missing_run_finished_is_a_warning(tmp_path, records):
    path = tmp_path / "events.elog"
    write(path, records[:-1])
    report = verify_log(path)
    assert report.ok and any("RunFinished" in w for w in report.warnings)


# -- one test per invariant ---------------------------------------------------------------------


def test_framing_dense_seq(records):
    gapped = [r if r.seq < 5 else msgspec.structs.replace(r, seq=r.seq + 1) for r in records]
    report = verify_records(gapped)
    assert (report.violation.seq, report.violation.invariant) == (6, "framing")
    assert report.violation.expected == "seq 5"


def test_framing_one_run_id(records):
    mixed = [r if r.seq != 7 else msgspec.structs.replace(r, run_id="other") for r in records]
    assert (verify_records(mixed).violation.seq, verify_records(mixed).violation.invariant) == (7, "framing")


def test_framing_env_on_run_scoped_and_nothing_after_run_finished(tmp_path, records):
    extra = msgspec.structs.replace(records[-1], seq=len(records), event=ev.CheckpointWritten(
        path="x", sha256="0", size_bytes=1, covers_seq=0, kind="full"))
    v = violation(tmp_path, records + [extra])
    assert (v.seq, v.invariant) == (len(records), "framing") and "RunFinished" in v.expected


def test_dense_epochs(tmp_path, records):
    i = find(records, ev.EpochCompleted, epoch=3)
    v = violation(tmp_path, tamper(records, i, epoch=4))
    assert (v.seq, v.invariant) == (i, "dense_epochs")


def test_stage_matches_the_fold(tmp_path, records):
    i = find(records, ev.StageChanged, to_stage=Stage.TRAINING)
    v = violation(tmp_path, tamper(records, i, from_stage=Stage.DORMANT))
    assert (v.seq, v.invariant) == (i, "stage_matches_fold")


def test_only_valid_transitions(tmp_path, records):
    i = find(records, ev.StageChanged, to_stage=Stage.TRAINING)
    v = violation(tmp_path, tamper(records, i, to_stage=Stage.BLENDING))
    assert (v.seq, v.invariant) == (i, "valid_transition")
    assert "GERMINATED -> BLENDING" in v.actual


def test_fossilized_never_changes(tmp_path, records):
    j = find(records, ev.SeedFossilized)
    fossil = records[j].event
    cull = [
        msgspec.structs.replace(records[j], batch_end=False, event=ev.StageChanged(
            epoch=fossil.epoch, slot="mid", seed_id=fossil.seed_id, from_stage=Stage.FOSSILIZED,
            to_stage=Stage.CULLED, reason="operator", trigger="command", epochs_in_previous_stage=0)),
        msgspec.structs.replace(records[j], event=ev.SeedCulled(
            epoch=fossil.epoch, slot="mid", seed_id=fossil.seed_id, reason="operator", initiator="operator",
            stage_at_cull=Stage.FOSSILIZED, epochs_total=0, total_improvement=None, last_counterfactual=None,
            decision_epoch=None)),
    ]
    v = violation(tmp_path, records[:j + 1] + cull + records[j + 1:])
    assert (v.seq, v.invariant) == (j + 1, "fossilized_terminal")


def test_a_gated_transition_needs_its_passing_verdict(tmp_path, records):
    i = find(records, ev.StageChanged, to_stage=Stage.BLENDING)
    assert isinstance(records[i - 1].event, ev.GateEvaluated) and records[i - 1].event.passed
    v = violation(tmp_path, tamper(records, i - 1, passed=False))
    assert (v.seq, v.invariant) == (i, "gated_transition") and "G2" in v.expected
    v = violation(tmp_path, drop(records, i - 1))
    assert (v.seq, v.invariant) == (i - 1, "gated_transition")


def test_alpha_within_zero_and_one(tmp_path, records):
    i = find(records, ev.AlphaChanged, reason="ramp_complete")
    v = violation(tmp_path, tamper(records, i, new=1.5))
    assert (v.seq, v.invariant) == (i, "alpha_range")


def test_alpha_matches_the_stage(tmp_path, records):
    i = find(records, ev.StageChanged, to_stage=Stage.BLENDING) + 1
    assert isinstance(records[i].event, ev.AlphaChanged)
    v = violation(tmp_path, tamper(records, i, new=0.0))
    assert (v.seq, v.invariant) == (i, "alpha_matches_stage") and "BLENDING" in v.expected


def test_one_live_seed_per_slot(tmp_path, records):
    i = find(records, ev.SeedGerminated, slot="late")
    moved = records
    for j in (i - 1, i, i + 1):  # the whole germination batch goes to the fossil's slot, as decided
        moved = tamper(moved, j, slot="mid")
    d = find(records, ev.PolicyDecided, epoch=9)
    fossilize, germinate = records[d].event.commands
    moved = tamper(moved, d, commands=(fossilize, msgspec.structs.replace(germinate, slot="mid")))
    v = violation(tmp_path, moved)
    assert (v.seq, v.invariant) == (i, "one_live_seed")


def test_embargo_duration_matches_the_config(tmp_path, records):
    i = find(records, ev.StageChanged, to_stage=Stage.RESETTING)
    v = violation(tmp_path, tamper(records, 0, config={"lifecycle": {**LIFECYCLE, "embargo_epochs": 3}}))
    assert (v.seq, v.invariant) == (i, "embargo_countdown")


def test_embargo_countdown_is_never_overdue(tmp_path, records):
    i = find(records, ev.StageChanged, to_stage=Stage.RESETTING)
    v = violation(tmp_path, drop(records, i))
    tick = find(records, ev.EpochTicked, epoch=records[i].event.epoch) - 1
    assert (v.seq, v.invariant) == (tick, "embargo_countdown") and "EMBARGOED for 2" in v.actual


def test_outcome_events_are_paired(tmp_path, records):
    i = find(records, ev.SeedCulled, slot="late")
    change = find(records, ev.StageChanged, to_stage=Stage.CULLED)
    v = violation(tmp_path, drop(records, i))
    assert (v.seq, v.invariant) == (change, "outcome_paired")


def test_counterfactual_real_acc_is_the_epochs_val_acc(tmp_path, records):
    i = find(records, ev.CounterfactualMeasured, kind="ablation")
    v = violation(tmp_path, tamper(records, i, real_acc=records[i].event.real_acc + 1.0))
    assert (v.seq, v.invariant) == (i, "counterfactual_real_acc")


def test_decisions_are_carried_out_in_order(tmp_path, records):
    d = find(records, ev.PolicyDecided, epoch=9)
    swapped = tuple(reversed(records[d].event.commands))
    v = violation(tmp_path, tamper(records, d, commands=swapped))
    assert (v.seq, v.invariant) == (d + 1, "decision_commands")


def test_state_digest(tmp_path, records):
    i = find(records, ev.EpochTicked, epoch=5)
    v = violation(tmp_path, tamper(records, i, state_digest="0" * 64))
    assert (v.seq, v.invariant) == (i, "state_digest")


def test_redecision_catches_logic_drift(tmp_path, records):
    i = find(records, ev.GateEvaluated, epoch=2, trigger="tick")
    drifted = tamper(records, i, score=0.25)
    v = violation(tmp_path, drifted)
    assert (v.seq, v.invariant) == (i, "redecide") and '"score":0.25' in v.actual
    # Written by another esper version, drift is a warning unless --strict.
    other = tamper(drifted, 0, esper_version="0.0.1")
    path = tmp_path / "other.elog"
    write(path, other)
    report = verify_log(path)
    assert report.ok and any("logic drift" in w for w in report.warnings)
    assert verify_log(path, strict=True).violation.invariant == "redecide"


def test_a_rejection_must_still_be_refused(tmp_path, records):
    i = find(records, ev.ActionRejected)
    v = violation(tmp_path, tamper(records, i, code="seed_limit_reached"))
    assert (v.seq, v.invariant) == (i, "redecide") and "slot_unavailable" in v.expected


def test_projections_agree_with_the_fold(tmp_path, records, monkeypatch):
    from esper.lifecycle import projections

    handlers = dict(projections._HANDLERS)
    handlers[ev.AlphaChanged] = lambda self, record, event: None  # a projection bug: alpha never moves
    monkeypatch.setattr(projections, "_HANDLERS", handlers)
    i = find(records, ev.AlphaChanged)
    end = next(j for j in range(i, len(records)) if records[j].batch_end)
    v = violation(tmp_path, records)
    assert (v.seq, v.invariant) == (end, "projections") and "SlotView mid" in v.expected


# -- the command line ---------------------------------------------------------------------------


def test_cli_exit_codes(tmp_path, records):
    good = tmp_path / "good"
    good.mkdir()
    write(good / "events.elog", records)
    result = CliRunner().invoke(cli, ["replay", str(good), "--verify"])
    assert result.exit_code == 0 and result.output.startswith("OK: ")

    bad = tmp_path / "bad.elog"
    i = find(records, ev.StageChanged, to_stage=Stage.TRAINING)
    write(bad, tamper(records, i, to_stage=Stage.BLENDING))
    result = CliRunner().invoke(cli, ["replay", str(bad), "--verify"])
    assert result.exit_code == 1
    assert f"violation at seq {i} (offset " in result.stdout and "valid_transition" in result.stdout
    result = CliRunner().invoke(cli, ["replay", str(bad), "--verify", "--json"])
    out = msgspec.json.decode(result.stdout)
    assert result.exit_code == 1 and out["violation"]["seq"] == i and out["violation"]["invariant"] == \
        "valid_transition" and out["violation"]["offset"] > 16

    garbage = tmp_path / "garbage.elog"
    garbage.write_bytes(b"not a log at all")
    result = CliRunner().invoke(cli, ["replay", str(garbage), "--verify"])
    assert result.exit_code == 2 and result.stderr.startswith("esper: error:")


def test_a_corrupt_seq_is_unreadable(tmp_path, records):
    """A checksummed frame with the wrong seq is corruption the reader refuses: exit code 2."""
    from esper.events.codec import encode_record
    from esper.events.log_format import header_bytes
    from log_helpers import frame

    path = tmp_path / "events.elog"
    body = b"".join(frame(encode_record(r if r.seq < 3 else msgspec.structs.replace(r, seq=r.seq + 1)))
                    for r in records)
    path.write_bytes(header_bytes() + body)
    result = CliRunner().invoke(cli, ["replay", str(path), "--verify"])
    assert result.exit_code == 2 and "seq 4 where 3 was expected" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name, args", [
    ("synthetic-random-24-s3", ("--policy", "random", "--epochs", "24", "--seed", "3")),  # culls, embargo, reuse
    ("synthetic-heuristic-30-s0", ("--policy", "heuristic", "--epochs", "30", "--seed", "0")),  # a fossil
])
def test_real_runs_verify(tmp_path_factory, name, args):
    from test_replay import shared_run

    run_dir = shared_run(tmp_path_factory, name, "--task", "synthetic", *args)
    result = CliRunner().invoke(cli, ["replay", str(run_dir), "--verify", "--strict"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("OK: ") and result.stderr == ""


def test_an_unknown_event_type_is_unreadable(tmp_path, records):
    from log_helpers import future_event_frame

    path = tmp_path / "events.elog"
    write(path, records)
    with open(path, "ab") as f:
        f.write(future_event_frame(len(records)))
    for args in (["--verify"], []):
        result = CliRunner().invoke(cli, ["replay", str(path), *args])
        assert result.exit_code == 2 and "FutureEvent" in result.stderr and "upgrade esper" in result.stderr
