"""`esper evaluate` (runtime §7.2, policy §9): contenders on the same seeds, one comparison table, and
the same table again from the logs it leaves behind.

The table's numbers are checked against SQL over the run directories (the DuckDB views), not
against the fold that computed them; the t-interval against a hand-computed case.
"""

import html
import json
import math
import re
import statistics
from pathlib import Path

import pytest

from cli_helpers import esper
from esper.replay import connect, evaluation, evaluation_table, report
from esper.replay.runlog import collect
from esper.replay.stats import mean_interval, t95
from esper.replay.svg import rendering
from esper.replay.timetravel import load

POLICIES = ["none", "random", "heuristic"]
# Checkpoints and fsyncs cost more than the simulator's epochs and are no part of the table.
SIMULATED = ["evaluate", "--backend", "simulated", "--epochs", "30", "--seeds", "3", "--set", "run.checkpoint_every=0",
             "--set", "run.fsync='never'"]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> tuple[Path, dict, str]:
    """Three contenders on three seeds, kept under --out, with the table as JSON."""
    out = tmp_path_factory.mktemp("evaluate") / "runs"
    code, stdout, stderr = esper(*SIMULATED, "--policies", ",".join(POLICIES), "--out", str(out), "--json")
    assert code == 0, stderr
    return out, json.loads(stdout), stderr


def sql_runs(out: Path) -> list[dict]:
    """Every run's numbers, by SQL alone."""
    con = connect([out])
    rows = con.execute("""
        WITH e AS (SELECT run_id, max(val_acc) AS best_val, sum(forward_passes) AS forward_passes,
                          arg_max(total_params, epoch) AS total FROM epochs GROUP BY run_id),
             s AS (SELECT run_id, count(*) AS germinated, count(*) FILTER (outcome = 'fossilized') AS fossilized,
                          count(*) FILTER (outcome = 'culled') AS culled FROM seeds GROUP BY run_id),
             b AS (SELECT run_id, count(*) AS rollbacks FROM rollbacks GROUP BY run_id),
             w AS (SELECT run_id, (epoch_us(max(ts)) - epoch_us(min(ts))) / 1e6 AS wall FROM events GROUP BY run_id)
        SELECT r.run_id, r.policy, r.seed, r.status, r.final['test_acc'], e.best_val, e.total - p.host_params,
               100.0 * (e.total - p.host_params) / p.host_params, coalesce(s.germinated, 0),
               coalesce(s.fossilized, 0), coalesce(s.culled, 0), coalesce(b.rollbacks, 0), w.wall, e.forward_passes
        FROM runs r JOIN e USING (run_id) JOIN episodes p USING (run_id) JOIN w USING (run_id)
        LEFT JOIN s USING (run_id) LEFT JOIN b USING (run_id)""").fetchall()
    keys = ["run_id", "policy", "seed", "status", "final_test", "best_val", "added_params", "added_pct",
            "germinated", "fossilized", "culled", "rollbacks", "wall_time_s", "forward_passes"]
    return [dict(zip(keys, row)) for row in rows]


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and 95 % half-width, the textbook way."""
    return statistics.mean(values), t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def test_every_policy_runs_on_every_seed_and_the_logs_stay(simulated):
    out, table, stderr = simulated
    dirs = sorted(p.name for p in out.iterdir())
    assert len(dirs) == 9 and all((out / d / "events.elog").is_file() and (out / d / "config.toml").is_file()
                                  for d in dirs)
    for policy in POLICIES:
        assert sorted(d[-2:] for d in dirs if f"-{policy}-" in d) == ["s0", "s1", "s2"]  # named as in §6.1
    assert [c["policy"] for c in table["contenders"]] == POLICIES  # in the order given
    assert len(re.findall(r"^\[\d/9\] ", stderr, re.M)) == 9 and "runs kept under" in stderr


def test_the_table_is_what_sql_says_about_the_logs(simulated):
    out, table, _ = simulated
    runs = sql_runs(out)
    for contender in table["contenders"]:
        mine = [r for r in runs if r["policy"] == contender["policy"]]
        assert contender["runs"] == contender["completed"] == 3
        for key, stated in contender["metrics"].items():
            mean, half = interval([float(r[key]) for r in mine])
            assert stated["mean"] == pytest.approx(mean, abs=1e-9), key
            assert stated["half_width"] == pytest.approx(half, abs=1e-9), key
            assert stated["n"] == 3
    none = {r["seed"]: r["final_test"] for r in runs if r["policy"] == "none"}
    heuristic = next(c for c in table["contenders"] if c["policy"] == "heuristic")["paired_vs_none"]
    diffs = [r["final_test"] - none[r["seed"]] for r in runs if r["policy"] == "heuristic"]
    mean, half = interval(diffs)
    assert heuristic["final_test_difference"]["mean"] == pytest.approx(mean)
    assert heuristic["final_test_difference"]["low"] == pytest.approx(mean - half)
    assert (heuristic["wins"], heuristic["losses"], heuristic["ties"]) == (
        sum(d > 0 for d in diffs), sum(d < 0 for d in diffs), sum(d == 0 for d in diffs))
    assert heuristic["verdict"] == ("better" if mean - half > 0 else "worse" if mean + half < 0
                                    else "no difference shown")
    assert next(c for c in table["contenders"] if c["policy"] == "none")["paired_vs_none"] is None


def test_the_logs_give_the_same_table_to_evaluate_and_report(simulated, tmp_path):
    out, table, _ = simulated
    again = evaluation.from_logs(sorted(out.iterdir()))
    assert json.loads(json.dumps(again.to_json()))["contenders"] == table["contenders"]
    with rendering():  # the comparison section alone: each run's own plots take seconds
        section = report._comparison([collect(load(path)) for path in sorted(out.iterdir())])
    table_html = section.split("</table>")[0]
    shown = [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
             for row in re.findall(r"<tr>(.*?)</tr>", table_html)]
    assert shown == [[]] + [[label, *cells] for label, cells in evaluation_table.rows(again)]


def test_a_small_torch_evaluation_prints_the_table_and_removes_its_runs():
    code, stdout, stderr = esper("evaluate", "--task", "digits", "--epochs", "6", "--seeds", "2",
                                 "--policies", "none,heuristic", "--set", "run.threads=1")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].split() == ["none", "heuristic"]
    assert lines[2].split() == ["runs", "2", "2"]
    assert any(line.startswith("final test minus none (paired by seed)") for line in lines)
    scratch = Path(re.search(r"runs under (\S+)", stderr).group(1))
    assert scratch.name.startswith("esper-evaluate-") and not scratch.exists()


def test_failed_runs_are_counted_not_averaged(tmp_path):
    # The simulator's NaN losses exhaust a governor allowed one rollback on seed 2 (fixed seeds).
    code, stdout, stderr = esper(*SIMULATED, "--epochs", "20", "--policies", "none,heuristic", "--out",
                                 str(tmp_path), "--json", "--set", "simulated.nan_probability=0.05",
                                 "--set", "governor.max_rollbacks=1")
    assert code == 0, stderr
    statuses = {(r["policy"], r["seed"]): r["status"] for r in sql_runs(tmp_path)}
    failed = sorted(k for k, s in statuses.items() if s == "failed")
    assert failed and "failed: governor exhausted" in stderr
    for contender in json.loads(stdout)["contenders"]:
        bad = sum(1 for (p, _), s in statuses.items() if p == contender["policy"] and s == "failed")
        assert (contender["runs"], contender["completed"]) == (3, 3 - bad)
        assert contender["metrics"]["final_test"]["n"] == 3 - bad


def test_the_t_interval_matches_a_hand_computed_case():
    # 1..5: mean 3, sample variance 2.5, standard error sqrt(0.5); t(0.975, 4) = 2.776.
    mean, half = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.776 * math.sqrt(0.5))
    assert mean_interval([7.0]) == (7.0, None)
    paired = evaluation.Paired(evaluation.estimate([1.0, 2.0, -0.5]), 2, 1, 0)
    assert paired.verdict == "no difference shown"  # mean 0.83, half 4.303 * 1.258 / sqrt(3) = 3.13
    assert paired.difference.half == pytest.approx(4.303 * statistics.stdev([1.0, 2.0, -0.5]) / math.sqrt(3))
    assert evaluation.Paired(evaluation.estimate([1.0, 1.2, 0.9]), 3, 0, 0).verdict == "better"
    assert evaluation.Paired(evaluation.estimate([-1.0, -1.2, -0.9]), 0, 3, 0).verdict == "worse"
    assert evaluation.Paired(evaluation.estimate([1.0]), 1, 0, 0).verdict == "too few seeds"


def test_the_t_table_agrees_with_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        assert t95(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=6e-4)


@pytest.mark.parametrize("args, words", [
    (["--policies", "none,bogus"], ["unknown policy 'bogus'"]),
    (["--policies", "none,ppo:/no/such/policy.pt"], ["/no/such/policy.pt"]),
    (["--policies", "none,,heuristic"], ["empty policy spec"]),
    (["--policies", "none,random,none"], ["'none' is listed twice"]),
    (["--seeds", "0"], ["--seeds"]),
    (["--slots", "early,nowhere"], ["unknown slot 'nowhere'"]),
    (["--set", "lifecycle.nope=1"], ["unknown config key"]),
    (["--data", "somewhere"], ["reads no data"]),
])
def test_bad_input_is_one_line_before_any_run(tmp_path, args, words):
    code, _, err = esper("evaluate", "--backend", "simulated", "--out", str(tmp_path / "runs"), *args)
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("esper: error: "), err
    assert all(word in lines[0] for word in words), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
