"""Analytics with DuckDB (events spec §8) on the logs of real short runs: every view and every
README question, each number checked against the folded projections or the records themselves."""

import csv
import io
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from esper.cli.main import cli
from esper.events import catalogue as c
from esper.events.enums import Stage
from esper.events.log import LogError, LogReader, LogWriter, UnknownEventType
from esper.lifecycle.fold import fold
from esper.policy.rewards import COMPONENTS
from esper.replay.loader import connect
from esper.replay.sql import QueryError, run
from esper.replay.views import QUESTIONS, VIEWS
from event_factory import RUN_ID, example
from log_helpers import future_event_frame, write_log

pytestmark = pytest.mark.slow

# Random-policy synthetic runs of 30 epochs; seed 18 fossilizes one seed, culls five and ends the
# episode with one still training, so every outcome is in the log.
SEEDS = (18, 12, 15)
RUN_SCOPED = {"runs", "ppo_updates", "checkpoints"}
NOT_PER_EVENT = {"seeds", "runs"}
LIVE = (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from esper.policy.run_config import resolve
    from esper.policy.runner import Run, execute, load_data

    root = tmp_path_factory.mktemp("runs")
    for seed in SEEDS:
        config = resolve({"run": {"task": "synthetic", "epochs": 30, "policy": "random", "seed": seed,
                                  "threads": 1, "checkpoint_every": 0}})
        (root / f"seed{seed}").mkdir()
        execute(Run(config, root / f"seed{seed}", load_data(config)))
    return root


@pytest.fixture(scope="module")
def log(runs) -> Path:
    return runs / f"seed{SEEDS[0]}" / "events.elog"


@pytest.fixture(scope="module")
def records(log) -> list:
    return list(LogReader(log).records())


@pytest.fixture(scope="module")
def folded(records):
    return fold(records).projections


@pytest.fixture(scope="module")
def con(log):
    return connect([log.parent])


def query(con, sql: str, params=()) -> list[dict]:
    rows = con.execute(sql, list(params)).fetchall()
    names = [d[0] for d in con.description]
    return [dict(zip(names, row)) for row in rows]


def events_of(records, cls) -> list:
    return [r for r in records if type(r.event) is cls]


def test_the_run_fossilizes_culls_and_ends_with_a_live_seed(folded):
    assert {s.outcome for s in folded.seeds} == {"fossilized", "culled", "episode_ended"}


def test_every_view_has_its_keys_and_one_row_per_fact(con, records):
    per_type = Counter(type(r.event) for r in records)
    expected = {
        "events": len(records), "epochs": per_type[c.EpochCompleted], "episodes": per_type[c.EpisodeStarted],
        "stage_changes": per_type[c.StageChanged], "gate_verdicts": per_type[c.GateEvaluated],
        "gate_checks": sum(len(r.event.checks) for r in events_of(records, c.GateEvaluated)),
        "seeds": per_type[c.SeedGerminated], "counterfactuals": per_type[c.CounterfactualMeasured],
        "seed_measurements": per_type[c.SeedMeasured], "alpha_changes": per_type[c.AlphaChanged],
        "decisions": per_type[c.PolicyDecided],
        "decision_commands": sum(len(r.event.commands) for r in events_of(records, c.PolicyDecided)),
        "rewards": per_type[c.RewardComputed],
        "reward_components": sum(len(r.event.components) for r in events_of(records, c.RewardComputed)),
        "reward_seeds": sum(len(r.event.seeds) for r in events_of(records, c.RewardComputed)),
        "rollbacks": 0, "ppo_updates": 0, "checkpoints": 0, "runs": 1,
    }
    assert set(expected) == set(VIEWS)
    for view, count in expected.items():
        rows = query(con, f"SELECT * FROM {view}")
        assert len(rows) == count, view
        keys = {"run_id", "env", "episode"} | (set() if view in NOT_PER_EVENT else {"seq", "epoch"})
        assert keys <= {d["column_name"] for d in query(con, f"DESCRIBE {view}")}, view
        assert all(r["run_id"] == records[0].run_id for r in rows), view
        if view in RUN_SCOPED:
            assert all(r["env"] is None and r["episode"] is None for r in rows), view
        elif view != "events":
            assert all(r["env"] == 0 and r["episode"] == 0 for r in rows), view
    assert query(con, "SELECT count(*) AS n FROM stages")[0]["n"] == len(Stage)


def test_epochs_are_the_folded_curves(con, folded):
    rows = query(con, "SELECT env, episode, epoch, train_loss, train_acc, val_loss, val_acc FROM epochs ORDER BY seq")
    curves = [(env, ep, t, p.train_loss, p.train_acc, p.val_loss, p.val_acc) for env, ep, t, p in folded.run.curves]
    assert [tuple(r.values()) for r in rows] == curves


def test_stage_changes_are_the_folded_histories(con, folded):
    rows = query(con, "SELECT seed_id, blueprint, to_stage, to_stage_id, epoch, seq, reason FROM stage_changes")
    seeds = {s.seed_id: s for s in folded.seeds}
    history = sorted((s.seed_id, s.blueprint, stage.name, int(stage), epoch, seq, reason)
                     for s in folded.seeds for stage, epoch, seq, reason in s.history)
    assert sorted(tuple(r.values()) for r in rows) == history
    first = query(con, "SELECT from_stage FROM stage_changes WHERE reason = 'germinate'")
    assert {r["from_stage"] for r in first} == {"DORMANT"} and len(first) == len(seeds)


def _stage_epochs(seed, last_epoch: int) -> dict[Stage, int]:
    """Epochs per stage from a SeedView's history: to the next change, or to the episode's end."""
    spent = Counter()
    for (stage, epoch, _, _), following in zip(seed.history, seed.history[1:] + ((None, last_epoch, 0, ""),)):
        spent[stage] += following[1] - epoch
    return spent


def test_seeds_are_the_folded_seed_views(con, folded):
    last_epoch = {(env, ep): n for env, ep, n in folded.run.episodes}
    rows = {r["seed_id"]: r for r in query(con, "SELECT * FROM seeds")}
    assert set(rows) == {s.seed_id for s in folded.seeds}
    for s in folded.seeds:
        row, end = rows[s.seed_id], last_epoch[(s.env, s.episode)]
        spent = _stage_epochs(s, end)
        assert row == row | {
            "slot": s.slot, "blueprint": s.blueprint, "blend": s.blend, "seed_params": s.seed_params,
            "germinated_epoch": s.germinated_epoch, "ended_epoch": s.ended_epoch, "outcome": s.outcome,
            "final_stage": s.stage.name, "cull_reason": s.cull_reason, "last_contribution": s.last_contribution,
            "lifetime_epochs": (s.ended_epoch if s.ended_epoch is not None else end) - s.germinated_epoch,
            **{f"epochs_{stage.name.lower()}": spent[stage] for stage in LIVE},
        }, s.seed_id
        culled = [e for e in s.history if e[0] == Stage.CULLED]
        assert (row["stage_at_cull"] is None) == (not culled)


def test_gate_verdicts_and_checks_are_the_folded_verdicts(con, folded):
    verdicts = sorted((s.seed_id, gate, epoch, passed, failed) for s in folded.seeds
                      for gate, epoch, passed, failed in s.verdicts)
    # A seed's view starts at its germination, after the G0 verdict that allowed it; G0 is in the counts.
    rows = query(con, "SELECT seed_id, gate, epoch, passed, seq FROM gate_verdicts WHERE gate <> 'G0'")
    failed = defaultdict(tuple)
    for r in query(con, "SELECT seq, tag FROM gate_checks WHERE NOT check_passed ORDER BY seq, check_index"):
        failed[r["seq"]] += (r["tag"],)
    assert sorted((r["seed_id"], r["gate"], r["epoch"], r["passed"], failed[r["seq"]]) for r in rows) == verdicts
    counts = dict(folded.run.counts)
    for r in query(con, "SELECT gate, passed, count(*) AS n FROM gate_verdicts GROUP BY ALL"):
        assert counts[f"gate_{r['gate']}_{'passed' if r['passed'] else 'failed'}"] == r["n"]


def test_decisions_and_rewards_are_the_logged_ones(con, records, folded):
    counts = dict(folded.run.counts)
    ops = Counter(op for r in query(con, "SELECT ops FROM decisions") for op in (r["ops"] or ["wait"]))
    assert ops == {k.removeprefix("decision_"): v for k, v in counts.items() if k.startswith("decision_")}
    commands = [(r.seq, i, cmd.op, cmd.slot, cmd.blueprint) for r in events_of(records, c.PolicyDecided)
                for i, cmd in enumerate(r.event.commands)]
    rows = query(con, "SELECT seq, index, op, slot, blueprint FROM decision_commands ORDER BY seq, index")
    assert [tuple(r.values()) for r in rows] == commands
    rejected = query(con, "SELECT count(*) AS n FROM decision_commands WHERE rejected")[0]["n"]
    assert rejected == counts.get("rejections", 0)

    rewards = {r.seq: r.event for r in events_of(records, c.RewardComputed)}
    for row in query(con, "SELECT * FROM rewards"):
        event = rewards[row["seq"]]
        assert (row["decision_epoch"], row["mode"], row["total_raw"]) == (event.decision_epoch, event.mode,
                                                                         event.total_raw)
        assert {name: row[name] for name in COMPONENTS} == {name: event.components.get(name) for name in COMPONENTS}
    assert query(con, "SELECT count(*) AS n FROM rewards WHERE pbrs IS NOT NULL")[0]["n"] == 0  # not in simplified


def test_runs_is_the_folded_run_view(con, folded, records):
    row = query(con, "SELECT * FROM runs")[0]
    run = folded.run
    assert (row["run_id"], row["task"], row["seed"], row["policy"], row["status"]) == (
        run.run_id, run.task, run.seed, run.policy, run.status)
    finished = records[-1].event
    assert row["final"] == finished.final and row["episodes_completed"] == finished.episodes_completed
    assert (row["events"], row["last_seq"], row["tail"]) == (len(records), records[-1].seq, "clean")


def test_question_time_in_stage_per_blueprint(con, folded):
    spans = defaultdict(list)
    for s in folded.seeds:
        for (stage, epoch, _, _), following in zip(s.history, s.history[1:]):
            spans[(s.blueprint, stage.name)].append(following[1] - epoch)
    rows = query(con, QUESTIONS["time in stage per blueprint"])
    assert {(r["blueprint"], r["to_stage"]): r["n"] for r in rows} == {k: len(v) for k, v in spans.items()}
    for r in rows:
        span = spans[(r["blueprint"], r["to_stage"])]
        assert r["mean_epochs"] == pytest.approx(sum(span) / len(span))
    assert [(r["blueprint"], r["to_stage"]) for r in rows] == sorted((r["blueprint"], r["to_stage"]) for r in rows)


def test_question_gate_failure_reasons_by_gate(con, folded):
    failures = Counter((gate, tag) for s in folded.seeds for gate, _, _, failed in s.verdicts for tag in failed)
    rows = query(con, QUESTIONS["gate failure reasons by gate"])
    assert {(r["gate"], r["tag"]): r["failures"] for r in rows} == failures and failures
    assert [(r["gate"], -r["failures"]) for r in rows] == sorted((r["gate"], -r["failures"]) for r in rows)


def test_question_fossilization_rate_per_blueprint(con, folded):
    germinated = Counter(s.blueprint for s in folded.seeds)
    fossilized = Counter(s.blueprint for s in folded.seeds if s.outcome == "fossilized")
    rows = query(con, QUESTIONS["fossilization rate per blueprint"])
    assert {r["blueprint"]: (r["germinated"], r["fossilized"], r["rate"]) for r in rows} == {
        b: (n, fossilized[b], pytest.approx(round(fossilized[b] / n, 3))) for b, n in germinated.items()}
    assert [r["rate"] for r in rows] == sorted((r["rate"] for r in rows), reverse=True)


def test_question_accuracy_curve_per_run(con, folded):
    rows = query(con, QUESTIONS["accuracy curve per run"])
    assert [tuple(r.values()) for r in rows] == [(folded.run.run_id, env, ep, t, p.val_acc)
                                                 for env, ep, t, p in folded.run.curves]


def test_question_reward_components_per_decision(con, records):
    rewards = {(r.env, r.episode, r.event.decision_epoch): r.event.components
               for r in events_of(records, c.RewardComputed)}
    expected = [(r.run_id, r.env, r.episode, r.event.epoch, [cmd.op for cmd in r.event.commands], name, value)
                for r in events_of(records, c.PolicyDecided)
                for name, value in sorted(rewards.get((r.env, r.episode, r.event.epoch), {}).items())]
    rows = query(con, QUESTIONS["reward components per decision"])
    assert [tuple(r.values()) for r in rows] == expected and expected


README = Path(__file__).parent.parent / "README.md"


def test_the_readme_shows_every_question():
    readme = " ".join(README.read_text().split())
    for sql in QUESTIONS.values():
        assert " ".join(sql.split()) in readme


def test_the_readme_documents_every_column_of_every_view(con):
    rows = {line.split("|")[1].strip(" `"): line for line in README.read_text().splitlines()
            if line.startswith("| `")}
    for view in VIEWS:
        columns = {d["column_name"] for d in query(con, f"DESCRIBE {view}")} - {"run_id", "env", "episode", "seq",
                                                                                "epoch"}
        assert {c for c in columns if f"`{c}`" not in rows[view]} == set(), view


def test_three_runs_by_glob_equal_three_single_runs(runs):
    every = connect([str(runs / "*" / "events.elog")])
    sql = ("SELECT run_id, count(*) AS epochs, max(val_acc) AS best, "
           "(SELECT count(*) FROM seeds s WHERE s.run_id = e.run_id AND outcome = 'culled') AS culled "
           "FROM epochs e GROUP BY run_id ORDER BY run_id")
    together = query(every, sql)
    assert len(together) == 3 and len({r["run_id"] for r in together}) == 3
    apart = sorted((row for seed in SEEDS for row in query(connect([runs / f"seed{seed}"]), sql)),
                   key=lambda r: r["run_id"])
    assert together == apart
    assert query(every, "SELECT count(*) AS n FROM runs")[0]["n"] == 3
    assert connect([runs]).execute("SELECT count(DISTINCT run_id) FROM raw_events").fetchall() == [(3,)]


def test_only_reading_statements_run(con):
    for sql in ("DELETE FROM raw_events", "INSERT INTO stages VALUES (99, 'X')", "CREATE TABLE t (a INT)",
                "DROP VIEW seeds", "COPY epochs TO 'x.csv'", "ATTACH 'x.db'", "SET threads = 1",
                "PRAGMA version", "EXPLAIN ANALYZE DELETE FROM raw_events", "SELECT 1; DROP VIEW seeds",
                "CALL pragma_version()", "INSTALL httpfs"):
        with pytest.raises(QueryError, match="only reading statements"):
            run(con, sql)
    assert query(con, "SELECT count(*) AS n FROM seeds")[0]["n"] > 0
    for sql in ("SELECT 1", "WITH a AS (SELECT 1) SELECT * FROM a", "DESCRIBE seeds", "SHOW TABLES",
                "SUMMARIZE epochs", "EXPLAIN SELECT * FROM seeds", "FROM epochs LIMIT 1"):
        assert run(con, sql)[0].columns
    with pytest.raises(QueryError, match="disabled by configuration"):
        run(con, "SELECT * FROM read_csv('/etc/hostname')")


def sql_cli(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, ["sql", *args], input=input)


def test_a_sql_error_is_one_line_and_exit_2(log):
    for args in ([str(log), "SELECT nope FROM epochs"], [str(log), "DROP VIEW seeds"],
                 [str(log.parent / "nowhere"), "SELECT 1"], [str(log), "SELEC 1"]):
        result = sql_cli(*args)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("esper: error: ") and result.stderr.count("\n") == 1, result.stderr


def test_formats_and_out_file(con, log, tmp_path):
    sql = "SELECT epoch, val_acc, ops FROM epochs JOIN decisions USING (run_id, env, episode, epoch) ORDER BY epoch"
    expected = query(con, sql)
    rows = list(csv.DictReader(io.StringIO(sql_cli(str(log), sql, "--format", "csv").stdout)))
    assert [(int(r["epoch"]), float(r["val_acc"]), json.loads(r["ops"])) for r in rows] == [
        tuple(r.values()) for r in expected]
    assert json.loads(sql_cli(str(log), sql, "--format", "json").stdout) == expected
    table = sql_cli(str(log), sql).stdout.splitlines()
    assert table[0].split(" | ")[0].strip() == "epoch" and table[-1] == f"({len(expected)} rows)"
    out = tmp_path / "q.json"
    assert sql_cli(str(log), sql, "--format", "json", "--out", str(out)).exit_code == 0
    assert json.loads(out.read_text()) == expected


def test_views_lists_every_view(log):
    listed = sql_cli(str(log), "--views", "--format", "csv").stdout
    assert set(VIEWS) <= {r["view"] for r in csv.DictReader(io.StringIO(listed))}


def test_the_prompt_runs_statements_until_the_input_ends(log):
    script = "SELECT count(*) AS n\nFROM epochs;\nSELECT nope;\nDELETE FROM raw_events;\nSELECT 41 + 1 AS answer"
    result = sql_cli(str(log), "--format", "csv", input=script)
    assert result.exit_code == 0
    assert result.stdout.split() == ["n", "30", "answer", "42"]
    assert result.stderr.count("esper: error: ") == 2
    assert sql_cli(str(log), input=".quit\nSELECT 1;\n").stdout == ""


def test_parquet_export_writes_every_view_and_reads_back(runs, tmp_path):
    import duckdb

    out = tmp_path / "parquet"
    result = CliRunner().invoke(cli, ["export", str(runs), "--parquet", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.stem for p in out.iterdir()) == sorted(VIEWS)
    every, files = connect([runs]), duckdb.connect()
    for view in VIEWS:
        back = files.execute("SELECT count(*) FROM read_parquet(?)", [str(out / f"{view}.parquet")]).fetchall()
        assert back == every.execute(f"SELECT count(*) FROM {view}").fetchall(), view
    seeds = files.execute("SELECT outcome, count(*) FROM read_parquet(?) GROUP BY ALL ORDER BY ALL",
                          [str(out / "seeds.parquet")]).fetchall()
    assert seeds == every.execute("SELECT outcome, count(*) FROM seeds GROUP BY ALL ORDER BY ALL").fetchall()


def test_jsonl_export_is_one_line_per_record(log, records, tmp_path):
    out = tmp_path / "run.jsonl"
    assert CliRunner().invoke(cli, ["export", str(log), "--jsonl", str(out)]).exit_code == 0
    assert len(out.read_text().splitlines()) == len(records)
    assert CliRunner().invoke(cli, ["export", str(log)]).exit_code == 2


def _examples_log(path: Path) -> dict:
    """RunStarted, every env-scoped example in one batch, then the run-scoped ones."""
    run_scoped = [example(c.CheckpointWritten), example(c.PolicyUpdated), example(c.RunFinished)]
    env_scoped = [example(cls) for cls in c.EVENT_TYPES if cls not in c.RUN_SCOPED]
    with LogWriter.create(path, fsync="never") as writer:
        writer.append_batch(RUN_ID, None, None, [example(c.RunStarted)])
        writer.append_batch(RUN_ID, 0, 0, env_scoped)
        writer.append_batch(RUN_ID, None, None, run_scoped)
    return {type(e): e for e in run_scoped + env_scoped}


# The views that are one event type's payload, field for field.
FLAT = {"epochs": c.EpochCompleted, "gate_verdicts": c.GateEvaluated, "counterfactuals": c.CounterfactualMeasured,
        "seed_measurements": c.SeedMeasured, "alpha_changes": c.AlphaChanged, "rollbacks": c.GovernorRolledBack,
        "ppo_updates": c.PolicyUpdated, "checkpoints": c.CheckpointWritten}


def test_flat_views_hold_every_field_of_their_event(tmp_path):
    events = _examples_log(tmp_path / "events.elog")
    con = connect([tmp_path])
    for view, cls in FLAT.items():
        (row,) = query(con, f"SELECT * FROM {view}")
        as_json = msgspec.json.decode(msgspec.json.encode(events[cls]))  # NaN becomes null, as in the views
        del as_json["type"]
        for field, value in as_json.items():
            enum = getattr(events[cls], field)
            if isinstance(enum, (Stage, c.Gate)):
                assert (row[field], row[f"{field}_id"]) == (enum.name, value), (view, field)
            else:
                assert row[field] == value, (view, field)
    rejected = query(con, "SELECT rejected, code FROM decision_commands")
    assert rejected == [{"rejected": True, "code": "slot_occupied"}]
    assert query(con, "SELECT rejected FROM decisions") == [{"rejected": 1}]
    reward = query(con, "SELECT rent, pbrs FROM rewards")[0]
    assert reward == {"rent": 0.0, "pbrs": None}
    assert query(con, "SELECT component FROM reward_components ORDER BY ALL") == [
        {"component": "accuracy"}, {"component": "rent"}]
    run_row = query(con, "SELECT status, forked_from, forked_at_seq, final FROM runs")[0]
    assert run_row == {"status": "completed", "forked_from": "run-parent", "forked_at_seq": 41,
                       "final": {"val_acc": 91.0, "test_acc": None}}
    assert query(con, "SELECT stage FROM reward_seeds") == [{"stage": "TRAINING"}]
    assert math.isnan(events[c.GovernorRolledBack].loss_at_panic)


def test_torn_tails_load_with_a_warning_and_damage_is_an_error(tmp_path, capsys):
    path = tmp_path / "events.elog"
    write_log(path, [[example(c.EpochCompleted)]] * 3)
    with open(path, "ab") as f:
        f.write(b"\x10\x00\x00\x00partial")
    con = connect([path])
    assert "torn tail" in capsys.readouterr().err
    assert query(con, "SELECT records, tail FROM logs") == [{"records": 4, "tail": "torn"}]

    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LogError, match="corrupt"):
        connect([path])
    assert sql_cli(str(path), "SELECT 1").exit_code == 2


def test_unknown_event_types_fail_unless_kept(tmp_path):
    path = tmp_path / "events.elog"
    write_log(path, [[example(c.EpochCompleted)]])
    with open(path, "ab") as f:
        f.write(future_event_frame(2))
    with pytest.raises(UnknownEventType):
        connect([path])
    con = connect([path], allow_unknown_events=True)
    assert query(con, "SELECT type, event->>'$.epoch' AS epoch FROM events WHERE seq = 2") == [
        {"type": "FutureEvent", "epoch": "1"}]
    assert query(con, "SELECT val_acc FROM epochs") == [{"val_acc": example(c.EpochCompleted).val_acc}]
    result = sql_cli(str(path), "SELECT 1")
    assert result.exit_code == 2 and "FutureEvent" in result.stderr


def test_two_copies_of_one_run_are_refused(log, tmp_path):
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "events.elog").write_bytes(log.read_bytes())
    with pytest.raises(LogError, match="hold the same run"):
        connect([log, tmp_path / "copy"])
