"""`esper report` (runtime §7.4): one self-contained HTML file from one or more logs.

Plots are matplotlib figures inlined as SVG; there is no JavaScript and no remote resource, so the
file opens from disk. The same logs give the same file apart from its generated-at line. Only
committed batches are read, so interrupted and running runs report what they have.
"""

import html
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import msgspec

from esper import __version__
from esper.events.log_format import LOG_NAME
from esper.replay import evaluation_table, plots
from esper.replay.evaluation import compare, run_metrics
from esper.replay.runlog import RunLog, collect
from esper.replay.svg import rendering
from esper.replay.timetravel import load

GENERATED_CLASS = "generated"

_STYLE = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #1a7f37; } .fail { color: #b42318; }
figure { margin: 0.5em 0; } figure svg { max-width: 100%; height: auto; }
pre { background: #f7f7f7; padding: 0.5em; font-size: 11px; overflow-x: auto; }
.generated { color: #777; font-size: 12px; }
"""


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Logs and run directories; a directory without a log of its own stands for every log below it."""
    logs: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir() and not (path / LOG_NAME).is_file():
            logs += sorted(path.rglob("*.elog"))
        else:
            logs.append(path / LOG_NAME if path.is_dir() else path)
    return logs


def build(paths: Sequence[str | Path], generated_at: str | None = None) -> str:
    """The report's HTML. Raises the log errors of the first unreadable log."""
    runs = [collect(load(path)) for path in expand(paths)]
    if generated_at is None:
        generated_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    title = "Esper report: " + (runs[0].header["run_id"] if len(runs) == 1 else f"{len(runs)} runs")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="{GENERATED_CLASS}">generated at {_e(generated_at)} by esper {_e(__version__)}</p>',
    ]
    with rendering():
        if len(runs) > 1:
            parts.append(_comparison(runs))
        for r, run in enumerate(runs):
            parts.append(_run_section(run, r))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write(paths: Sequence[str | Path], out: str | Path) -> Path:
    text = build(paths)
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(out)
    return out


# -- one run ------------------------------------------------------------------------------------


def _run_section(run: RunLog, r: int) -> str:
    m = run_metrics(run)
    h = run.header
    added = m["added_params"]
    share = f" ({100.0 * added / m['host_params']:.1f} % of host)" if added is not None and m["host_params"] else ""
    summary = [
        ("run id", h["run_id"]), ("log", h["path"]), ("task", h["task"]), ("policy", h["policy"]),
        ("seed", h["seed"]), ("status", h["status"]), ("episodes", len(h["episodes"])), ("epochs", h["epochs"]),
        ("events", f"{h['events']} (tail {h['tail']})"), ("final val score", _n(m["final_val"])),
        ("final test score", _n(m["final_test"])), ("best val score", _n(m["best_val"])),
        ("host parameters", m["host_params"]), ("added parameters", f"{_n(added, 'd')}{share}"),
        ("seeds", f"{m['germinated']} germinated, {m['fossilized']} fossilized, {m['culled']} culled, "
                  f"{m['germinated'] - m['fossilized'] - m['culled']} other"),
        ("rollbacks", m["rollbacks"]),
    ]
    if h["forked_from"]:
        summary.append(("forked from", f"{h['forked_from']['run_id']} at seq {h['forked_from']['seq']}"))
    config = msgspec.json.format(msgspec.json.encode(run.start.config if run.start else {}), indent=2).decode()
    parts = [
        f'<section id="run-{r}"><h2>{_e(h["run_id"])}</h2>',
        _table(["", ""], [[f"<b>{_e(k)}</b>", _e(v)] for k, v in summary], raw=True),
        f"<details><summary>configuration</summary><pre>{_e(config)}</pre></details>",
        "<h3>Score and loss</h3>", _figure(plots.curves(run, r)),
        "<h3>Stage swimlanes</h3>", _figure(plots.swimlanes(run, r)),
    ]
    drawn = plots.seeds(run, r)
    if drawn is not None:
        parts += ["<h3>Alpha and contribution per seed</h3>", _figure(drawn)]
    parts += ["<h3>Parameters</h3>", _figure(plots.parameters(run, r))]
    for title, drawn in (("Reward components", plots.rewards(run, r)), ("Policy updates", plots.updates(run, r))):
        if drawn is not None:
            parts += [f"<h3>{title}</h3>", _figure(drawn)]
    parts += ["<h3>Seeds</h3>", _seeds_table(run), "<h3>Gate verdicts</h3>", _verdicts_table(run),
              "<h3>Decisions</h3>", _decisions_table(run), "</section>"]
    return "\n".join(parts)


def _seeds_table(run: RunLog) -> str:
    rows = [[s["env"], s["episode"], s["seed_id"], s["slot"], s["blueprint"], s["stage"], _n(s["alpha"]),
             s["germinated_epoch"], _n(s["ended_epoch"], "d"), s["outcome"], s["cull_reason"] or "",
             _n(s["last_contribution"], "+.2f")] for s in run.seeds]
    if not rows:
        return "<p>No seed was germinated.</p>"
    return _table(["env", "episode", "seed", "slot", "blueprint", "stage", "alpha", "germinated", "ended",
                   "outcome", "cull reason", "last contribution"], rows)


def _verdicts_table(run: RunLog) -> str:
    rows = []
    for (env, episode), v in run.verdicts:
        failed = ", ".join(f"{c.tag} ({_n(c.value)} {c.comparator} {_n(c.threshold)})"
                           for c in v.checks if not c.passed)
        verdict = '<span class="pass">passed</span>' if v.passed else '<span class="fail">failed</span>'
        rows.append([v.epoch, env, episode, _e(v.slot), _e(v.seed_id), v.gate.name, verdict, _e(failed),
                     _e(v.message), v.trigger])
    if not rows:
        return "<p>No gate was evaluated.</p>"
    return _table(["epoch", "env", "episode", "slot", "seed", "gate", "passed", "failed checks", "message", "trigger"],
                  rows, raw=True)


def _decisions_table(run: RunLog) -> str:
    rows, waits = [], 0
    for (env, episode), d, outcomes in run.decisions:
        if not d.commands:
            waits += 1
            continue
        commands = "; ".join(
            " ".join(x for x in (c.op, c.slot, c.blueprint or "", c.blend.kind if c.blend else "") if x)
            + (f" ({c.reason})" if c.reason else "") for c in d.commands)
        rows.append([d.epoch, env, episode, d.policy, commands, "; ".join(outcomes), d.rationale])
    note = f"<p>{waits} decisions to wait are not listed.</p>" if waits else ""
    if not rows:
        return note or "<p>No decision was recorded.</p>"
    return _table(["epoch", "env", "episode", "policy", "commands", "outcome", "rationale"], rows) + note


# -- several runs -------------------------------------------------------------------------------


def _comparison(runs: list[RunLog]) -> str:
    """The table `esper evaluate` prints, from the same logs, and the mean validation curves."""
    metrics = [run_metrics(run) for run in runs]
    compared = compare(metrics)
    by_policy: dict[str, list[int]] = {}
    for i, m in enumerate(metrics):
        by_policy.setdefault(str(m["policy"]), []).append(i)
    curves = [(c.policy, [[p.val_acc for k in runs[i].keys for p in runs[i].epochs.get(k, [])]
                          for i in by_policy[c.policy]]) for c in compared.contenders]
    table = _table(["run", "policy", "seed", "status", "epochs", "final test", "best val", "added params"],
                   [[m["run_id"], m["policy"], m["seed"], m["status"], m["epochs"], _n(m["final_test"]),
                     _n(m["best_val"]), _n(m["added_params"], "d")] for m in compared.runs])
    return "\n".join([
        '<section id="comparison"><h2>Comparison</h2>',
        "<p>Mean ± half-width of the 95 % t-interval over each contender's completed runs; the difference "
        "in final test score to <code>none</code> pairs runs by seed, and a contender is called better only "
        "where its interval excludes 0.</p>",
        _table([""] + [c.policy for c in compared.contenders],
               [[label, *cells] for label, cells in evaluation_table.rows(compared)]),
        _figure(plots.comparison(curves)), "<h3>Runs</h3>", table, "</section>",
    ])


# -- HTML helpers -------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _n(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if spec == "d":
        return str(int(value))
    return format(value, spec)


def _table(columns: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    """Cells are escaped unless `raw` (then the caller escaped them); numbers align right."""
    head = "".join(f"<th>{_e(c)}</th>" for c in columns) if any(columns) else ""
    body = []
    for row in rows:
        cells = []
        for cell in row:
            numeric = isinstance(cell, (int, float)) or (isinstance(cell, str) and _numeric(cell))
            text = str(cell) if raw else _e(cell)
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + (f"<tr>{head}</tr>" if head else "") + "".join(body) + "</table>"


def _numeric(text: str) -> bool:
    try:
        float(text.split(" ")[0].replace(",", ""))
        return True
    except ValueError:
        return False


def _figure(drawn: plots.Drawn) -> str:
    return f"<figure>{drawn.svg}</figure>"
