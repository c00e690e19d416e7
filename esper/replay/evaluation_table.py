"""The comparison of policy §9 as rows of text cells: one row per quantity, one column per contender.

`esper evaluate` prints these rows and `esper report` renders the same rows as HTML, so the two
show the same strings for the same logs.
"""

from esper.replay.evaluation import BASELINE, METRICS, Comparison, Contender, Estimate


def cell(value: Estimate | None, digits: int, signed: bool = False) -> str:
    """'mean ± half' (the 95 % t-interval's half-width); the mean alone for a single run."""
    if value is None:
        return "-"
    spec = f"{'+' if signed else ''},.{digits}f"
    return format(value.mean, spec) + ("" if value.half is None else f" ± {format(value.half, f',.{digits}f')}")


def _runs(c: Contender) -> str:
    return str(c.runs) if c.completed == c.runs else f"{c.runs} ({c.runs - c.completed} not completed)"


def _interval(c: Contender) -> str:
    d = c.paired.difference if c.paired else None
    return "-" if d is None or d.half is None else f"[{d.low:+.2f}, {d.high:+.2f}]"


def rows(comparison: Comparison) -> list[tuple[str, list[str]]]:
    cs = comparison.contenders
    table = [("runs", [_runs(c) for c in cs])]
    table += [(m.label, [cell(c.metrics[m.key], m.digits) for c in cs]) for m in METRICS]
    if any(c.paired for c in cs):
        table += [
            (f"final test minus {BASELINE} (paired by seed)",
             [cell(c.paired and c.paired.difference, 2, signed=True) for c in cs]),
            ("  95 % interval", [_interval(c) for c in cs]),
            ("  wins / losses / ties", [f"{c.paired.wins} / {c.paired.losses} / {c.paired.ties}" if c.paired else "-"
                                        for c in cs]),
            (f"  vs {BASELINE}", [c.paired.verdict if c.paired else "-" for c in cs]),
        ]
    return table


def text(comparison: Comparison) -> str:
    """A fixed-width table; contenders are its columns."""
    table = [("", [c.policy for c in comparison.contenders])] + rows(comparison)
    label_width = max(len(label) for label, _ in table)
    widths = [max(len(r[1][i]) for r in table) for i in range(len(comparison.contenders))]
    lines = [f"{label:<{label_width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, widths))
             for label, values in table]
    lines.insert(1, "-" * len(lines[0]))
    notes = ["mean ± half-width of the 95 % t-interval over seeds, completed runs only;",
             f"a contender is better than {BASELINE} only where its paired interval excludes 0"]
    return "\n".join(lines + notes)
