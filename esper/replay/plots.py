"""The report's figures, each returned as inline SVG with the ids of its series.

Every series carries a `gid` of the form `<kind>-r<run>-<what>` so a reader (or a test) can find
and count them in the SVG: `curve-` (score and loss curves), `lane-` (one per env, episode and
slot), `marker-`, `alpha-`, `contribution-`, `params-`, `reward-`, `compare-`, `update-`.
"""

import math
from typing import Sequence

from matplotlib.collections import PatchCollection
from matplotlib.patches import Patch, Rectangle

from esper.events.enums import Stage
from esper.replay.runlog import Key, RunLog
from esper.replay.svg import new_figure, safe_id, to_svg

STAGE_COLOURS = {
    Stage.GERMINATED: "#c7e9c0", Stage.TRAINING: "#74c476", Stage.BLENDING: "#fd8d3c",
    Stage.PROBATIONARY: "#6baed6", Stage.FOSSILIZED: "#08519c", Stage.CULLED: "#de2d26",
    Stage.EMBARGOED: "#fcae91", Stage.RESETTING: "#fee5d9",
}
MAX_LANE_EPISODES = 8  # beyond this a swimlane figure would be unreadable; the tables still list everything


class Drawn:
    """One rendered figure: its SVG and the ids of the series in it."""

    def __init__(self, svg: str, ids: list[str]):
        self.svg, self.ids = svg, ids


def _key_id(key: Key) -> str:
    return f"e{key[0]}-k{key[1]}"


def _tag(run: RunLog, key: Key, name: str) -> str:
    label = run.label(key)
    return f"{label} {name}" if label else name


def curves(run: RunLog, r: int) -> Drawn:
    """Score and loss per epoch: train, val, test points, all-seeds-off reference."""
    fig = new_figure(9, 3.2)
    score_ax, loss_ax = fig.subplots(1, 2)
    ids: list[str] = []
    score = (run.start.score_kind if run.start else "accuracy")
    for key in run.keys:
        points = run.epochs.get(key, [])
        if not points:
            continue
        x = [p.epoch for p in points]
        for ax, kind in ((score_ax, "acc"), (loss_ax, "loss")):
            for name, style in (("train", "-"), ("val", "-"), ("all_off", ":")):
                values = [getattr(p, f"{name}_{kind}") for p in points]
                if all(v is None for v in values):
                    continue
                gid = f"curve-r{r}-{_key_id(key)}-{name}_{kind}"
                ax.plot(x, [math.nan if v is None else v for v in values], style, label=_tag(run, key, name),
                        gid=gid)
                ids.append(gid)
            tests = [(p.epoch, getattr(p, f"test_{kind}")) for p in points if getattr(p, f"test_{kind}") is not None]
            final = (run.finished.final.get(f"test_{kind}") if run.finished and len(run.episodes) == 1 else None)
            if final is not None and not any(epoch == x[-1] for epoch, _ in tests):
                tests.append((x[-1], final))
            if tests:
                gid = f"curve-r{r}-{_key_id(key)}-test_{kind}"
                ax.plot([t[0] for t in tests], [t[1] for t in tests], "o", label=_tag(run, key, "test"), gid=gid)
                ids.append(gid)
    _rollback_lines(run, [score_ax, loss_ax])
    score_ax.set(title="score" if score == "loss" else "accuracy (%)", xlabel="epoch")
    loss_ax.set(title="loss (nats)", xlabel="epoch")
    for ax in (score_ax, loss_ax):
        _legend(ax)
    return Drawn(to_svg(fig, f"r{r}-curves", ids), ids)


def _legend(ax, **options) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", **options)


def _rollback_lines(run: RunLog, axes) -> None:
    for _, rollback in run.rollbacks:
        for ax in axes:
            ax.axvline(rollback.epoch, color="#de2d26", linestyle="--", linewidth=0.8)


def swimlanes(run: RunLog, r: int) -> Drawn:
    """One lane per env, episode and slot; coloured stage segments; markers for germination (with
    blueprint), failed gates, fossilization, cull (with reason); dashed lines at rollbacks."""
    keys = run.keys[:MAX_LANE_EPISODES]
    lanes = [(key, slot) for key in keys for slot in run.slots(key)]
    fig = new_figure(9, 0.9 + 0.45 * max(1, len(lanes)))
    ax = fig.subplots()
    ids: list[str] = []
    row = {lane: i for i, lane in enumerate(lanes)}
    for (key, slot), y in row.items():
        end = run.last_epoch(key)
        history = run.stages.get((key, slot), [(0, Stage.DORMANT)])
        patches, colours = [], []
        for (start, stage), nxt in zip(history, history[1:] + [(end, None)]):
            if stage in STAGE_COLOURS and nxt[0] > start:
                patches.append(Rectangle((start, y - 0.35), nxt[0] - start, 0.7))
                colours.append(STAGE_COLOURS[stage])
        gid = f"lane-r{r}-{_key_id(key)}-{slot}"
        lane = PatchCollection(patches, facecolors=colours, edgecolors="none", gid=gid)
        ax.add_collection(lane)
        ax.plot([0, end], [y, y], color="#d9d9d9", linewidth=0.5, zorder=0)
        ids.append(gid)
    marks: dict[str, tuple[list[float], list[float], dict]] = {
        "germinate": ([], [], dict(marker="^", color="#238b45", s=36)),
        "failed_gate": ([], [], dict(marker="x", color="#636363", s=14, linewidths=0.8)),
        "fossilize": ([], [], dict(marker="*", color="#08306b", s=70)),
        "cull": ([], [], dict(marker="X", color="#a50f15", s=40)),
    }

    def mark(kind: str, key: Key, slot: str, epoch: int, text: str | None = None) -> None:
        if (key, slot) not in row:
            return
        y = row[(key, slot)]
        marks[kind][0].append(epoch)
        marks[kind][1].append(y)
        if text:  # blueprints above the lane, cull reasons below it
            ax.annotate(text, (epoch, y), xytext=(2, 7 if kind == "germinate" else -12), textcoords="offset points",
                        fontsize=6)

    for key, g in run.germinations:
        mark("germinate", key, g.slot, g.epoch, g.blueprint)
    for key, v in run.verdicts:
        if not v.passed:
            mark("failed_gate", key, v.slot, v.epoch)
    for key, f in run.fossils:
        mark("fossilize", key, f.slot, f.epoch)
    for key, c in run.culls:
        mark("cull", key, c.slot, c.epoch, c.reason)
    for kind, (xs, ys, style) in marks.items():
        if xs:
            gid = f"marker-r{r}-{kind}"
            ax.scatter(xs, ys, gid=gid, zorder=3, label=kind.replace("_", " "), **style)
            ids.append(gid)
    for key, rollback in run.rollbacks:
        rows = [y for (k, _), y in row.items() if k == key]
        if rows:
            gid = f"marker-r{r}-rollback-{_key_id(key)}-{rollback.rollback_index}"
            ax.vlines(rollback.epoch, min(rows) - 0.5, max(rows) + 0.5, colors="#de2d26", linestyles="--",
                      linewidth=0.8, gid=gid)
            ids.append(gid)
    ax.set_yticks(range(len(lanes)), [_tag(run, key, slot) for key, slot in lanes])
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_xlim(0, max((run.last_epoch(k) for k in keys), default=1) + 0.5)
    ax.set_xlabel("epoch")
    legend = [Patch(color=c, label=s.name) for s, c in STAGE_COLOURS.items()]
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=legend + handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=6)
    return Drawn(to_svg(fig, f"r{r}-lanes", ids), ids)


def seeds(run: RunLog, r: int) -> Drawn | None:
    """Alpha over epochs and ablation contribution (solid) / shadow gain (dotted) per seed."""
    if not run.alphas:
        return None
    fig = new_figure(9, 3)
    alpha_ax, contribution_ax = fig.subplots(1, 2)
    ids: list[str] = []
    for (key, seed_id), points in run.alphas.items():
        end = _seed_end(run, key, seed_id)
        xs, ys = _steps(points, end)
        gid = f"alpha-r{r}-{_key_id(key)}-{safe_id(seed_id)}"
        alpha_ax.step(xs, ys, where="post", label=_tag(run, key, seed_id), gid=gid)
        ids.append(gid)
    colours = {seed: f"C{i % 10}" for i, seed in enumerate(run.alphas)}
    for source, style, kind in ((run.contributions, "-o", "contribution"), (run.shadows, ":.", "shadow")):
        for (key, seed_id), points in source.items():
            gid = f"{kind}-r{r}-{_key_id(key)}-{safe_id(seed_id)}"
            contribution_ax.plot([p[0] for p in points], [math.nan if p[1] is None else p[1] for p in points],
                                 style, markersize=3, color=colours.get((key, seed_id)),
                                 label=_tag(run, key, f"{seed_id} {kind}"), gid=gid)
            ids.append(gid)
    contribution_ax.axhline(0, color="#969696", linewidth=0.6)
    alpha_ax.set(title="alpha per seed", xlabel="epoch", ylim=(-0.05, 1.05))
    contribution_ax.set(title="contribution per seed (pp)", xlabel="epoch")
    for ax in (alpha_ax, contribution_ax):
        _legend(ax, fontsize=6)
    return Drawn(to_svg(fig, f"r{r}-seeds", ids), ids)


def _seed_end(run: RunLog, key: Key, seed_id: str) -> int:
    for k, c in run.culls:
        if k == key and c.seed_id == seed_id:
            return c.epoch
    return run.last_epoch(key)


def _steps(points: list[tuple[int, float]], end: int) -> tuple[list[int], list[float]]:
    """Alpha as a step function: the value after the last change of each epoch."""
    by_epoch: dict[int, float] = {}
    for epoch, value in points:
        by_epoch[epoch] = value
    xs = sorted(by_epoch)
    ys = [by_epoch[x] for x in xs]
    if xs and end > xs[-1]:
        xs.append(end)
        ys.append(ys[-1])
    return xs, ys


def parameters(run: RunLog, r: int) -> Drawn:
    fig = new_figure(4.5, 2.6)
    ax = fig.subplots()
    ids: list[str] = []
    for key in run.keys:
        points = run.epochs.get(key, [])
        if not points:
            continue
        gid = f"params-r{r}-{_key_id(key)}"
        ax.plot([p.epoch for p in points], [p.total_params for p in points], label=_tag(run, key, "total"), gid=gid)
        ids.append(gid)
        ax.axhline(run.episodes[key].host_params, color="#969696", linestyle=":", linewidth=0.8)
    ax.set(title="parameters (dotted: host)", xlabel="epoch")
    return Drawn(to_svg(fig, f"r{r}-params", ids), ids)


def rewards(run: RunLog, r: int) -> Drawn | None:
    """Reward components per decision, stacked (positive up, negative down)."""
    if not run.rewards:
        return None
    names = sorted({name for _, reward in run.rewards for name in reward.components})
    fig = new_figure(9, 2.8)
    ax = fig.subplots()
    ids: list[str] = []
    x = list(range(len(run.rewards)))
    up, down = [0.0] * len(x), [0.0] * len(x)
    handles: list[Patch] = []
    for name in names:
        values = [reward.components.get(name) or 0.0 for _, reward in run.rewards]
        values = [0.0 if math.isnan(v) else v for v in values]
        bottoms = [up[i] if v >= 0 else down[i] for i, v in enumerate(values)]
        gid = f"reward-r{r}-{safe_id(name)}"
        colour = f"C{len(ids) % 10}"
        bars = [Rectangle((i - 0.45, b), 0.9, v) for i, (v, b) in enumerate(zip(values, bottoms)) if v]
        ax.add_collection(PatchCollection(bars, facecolors=colour, edgecolors="none", gid=gid))
        handles.append(Patch(color=colour, label=name))
        ids.append(gid)
        for i, v in enumerate(values):
            if v >= 0:
                up[i] += v
            else:
                down[i] += v
    ticks = x[:: max(1, len(x) // 12)]
    ax.set_xticks(ticks, [f"{_tag(run, run.rewards[i][0], str(run.rewards[i][1].decision_epoch))}" for i in ticks])
    ax.set(title="reward components per decision (x: decision epoch)")
    ax.axhline(0, color="#636363", linewidth=0.6)
    ax.set_xlim(-0.6, len(x) - 0.4)
    ax.set_ylim(min(down) * 1.1 - 1e-6, max(up) * 1.1 + 1e-6)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=6)
    return Drawn(to_svg(fig, f"r{r}-rewards", ids), ids)


def updates(run: RunLog, r: int) -> Drawn | None:
    """Policy updates (train-policy logs): KL, clip fraction, explained variance, entropy per head."""
    if not run.updates:
        return None
    fig = new_figure(9, 2.8)
    stats_ax, entropy_ax = fig.subplots(1, 2)
    ids: list[str] = []
    x = [u.update for u in run.updates]
    series = {
        "approx_kl": [u.approx_kl for u in run.updates],
        "clip_fraction": [sum(u.clip_fraction.values()) / max(1, len(u.clip_fraction)) for u in run.updates],
        "explained_variance": [math.nan if u.explained_variance is None else u.explained_variance
                               for u in run.updates],
    }
    for name, values in series.items():
        gid = f"update-r{r}-{name}"
        stats_ax.plot(x, values, "-o", markersize=3, label=name, gid=gid)
        ids.append(gid)
    for head in sorted({h for u in run.updates for h in u.entropy}):
        gid = f"update-r{r}-entropy-{safe_id(head)}"
        entropy_ax.plot(x, [u.entropy.get(head, math.nan) for u in run.updates], "-o", markersize=3, label=head,
                        gid=gid)
        ids.append(gid)
    stats_ax.set(title="policy updates", xlabel="update")
    entropy_ax.set(title="entropy per head", xlabel="update")
    for ax in (stats_ax, entropy_ax):
        _legend(ax, fontsize=6)
    return Drawn(to_svg(fig, f"r{r}-updates", ids), ids)


def comparison(groups: Sequence[tuple[str, list[list[float | None]]]]) -> Drawn:
    """Mean validation curve per contender with a 95 % t band over its runs."""
    from esper.replay.stats import mean_interval

    fig = new_figure(6, 3)
    ax = fig.subplots()
    ids: list[str] = []
    for name, curves_ in groups:
        length = max((len(c) for c in curves_), default=0)
        xs, means, lows, highs = [], [], [], []
        for i in range(length):
            values = [c[i] for c in curves_ if i < len(c) and c[i] is not None]
            if not values:
                continue
            mean, half = mean_interval(values)
            xs.append(i + 1)
            means.append(mean)
            lows.append(mean - (half or 0.0))
            highs.append(mean + (half or 0.0))
        gid = f"compare-{safe_id(name)}"
        line, = ax.plot(xs, means, label=f"{name} (n={len(curves_)})", gid=gid)
        ax.fill_between(xs, lows, highs, alpha=0.2, color=line.get_color())
        ids.append(gid)
    ax.set(title="mean validation score (band: 95 % interval)", xlabel="epoch")
    _legend(ax)
    return Drawn(to_svg(fig, "cmp", ids), ids)
