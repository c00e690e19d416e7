"""Matplotlib figures as inline SVG for a self-contained, deterministic HTML report.

Figures are built without pyplot (no process-global figure registry) and saved under a local
rc context: a fixed `svg.hashsalt`, text kept as text, no date. The SVG is then made safe to
inline next to others: no XML prolog, DOCTYPE or metadata (they name remote URLs), plain `href`
instead of `xlink:href`, and every id matplotlib generated prefixed with the figure's own prefix.
Ids the report sets itself (`gid`s, listed in `keep`) stay as they are, so tests can find series.
"""

import io
import re
from typing import Iterable

import matplotlib

matplotlib.use("Agg")  # before any backend is touched; the report never opens a window

from matplotlib.backends.backend_svg import FigureCanvasSVG  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

RC = {
    "svg.hashsalt": "esper-report",
    "svg.fonttype": "none",
    "font.size": 8,
    "axes.titlesize": 9,
    "legend.fontsize": 7,
}

_ID = re.compile(r'\bid="([^"]+)"')


def rendering():
    """The rc context every figure of a report is built in (fonts are read when text is made)."""
    return matplotlib.rc_context(RC)


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasSVG(figure)
    return figure


def to_svg(figure: Figure, prefix: str, keep: Iterable[str] = ()) -> str:
    keep = set(keep)
    buffer = io.StringIO()
    with matplotlib.rc_context(RC):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.DOTALL)
    text = text.replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "").replace("xlink:href=", "href=")
    renamed = {name: f"{prefix}-{name}" for name in _ID.findall(text) if name not in keep}
    if renamed:
        pattern = re.compile(r'(\bid="|href="#|url\(#)(' + "|".join(map(re.escape, sorted(renamed, key=len,
                                                                                           reverse=True))) + r')(["\)])')
        text = pattern.sub(lambda m: m.group(1) + renamed[m.group(2)] + m.group(3), text)
    return text.strip()


def safe_id(text: str) -> str:
    """An id-safe form of a label (seed ids hold '#')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)
