"""`esper report` (runtime §7.4): a self-contained HTML file with curves, swimlanes and tables."""

import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from esper.cli.main import cli
from esper.events import catalogue as ev
from esper.events.enums import Stage
from esper.replay import report, timetravel

pytestmark = pytest.mark.slow

SVG_NS = "http://www.w3.org/2000/svg"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A directory holding a heuristic run and a `none` run of the same task and seed."""
    from test_replay import shared_run

    out = tmp_path_factory.mktemp("report")
    for policy in ("heuristic", "none"):
        source = shared_run(tmp_path_factory, f"synthetic-{policy}-30-s0", "--task", "synthetic", "--epochs", "30",
                            "--seed", "0", "--policy", policy)
        (out / policy).mkdir()
        (out / policy / "events.elog").write_bytes((source / "events.elog").read_bytes())
    return out


class Document(HTMLParser):
    """Collects the tags, and the text of each inline <svg>."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[str] = []
        self.svgs: list[str] = []
        self._starts = [m.start() for m in re.finditer(r"<svg\b", text)]
        self._ends = [m.end() for m in re.finditer(r"</svg>", text)]
        self.feed(text)
        self.svgs = [text[a:b] for a, b in zip(self._starts, self._ends)]

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def series(svgs: list[str], prefix: str) -> dict[str, ET.Element]:
    """Every group whose id starts with `prefix`, parsed as SVG (so each figure is well-formed)."""
    found = {}
    for svg in svgs:
        root = ET.fromstring(svg)
        assert root.tag == f"{{{SVG_NS}}}svg"
        for element in root.iter(f"{{{SVG_NS}}}g"):
            gid = element.get("id", "")
            if gid.startswith(prefix):
                found[gid] = element
    return found


def render(tmp_path: Path, *paths: Path) -> str:
    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", *map(str, paths), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out.read_text()


def test_a_run_report_has_its_curves_swimlanes_and_tables(runs, tmp_path):
    run_dir = runs / "heuristic"
    text = render(tmp_path, run_dir)
    doc = Document(text)
    records = timetravel.load(run_dir).records
    epochs = [r.event for r in records if isinstance(r.event, ev.EpochCompleted)]
    seeds = [r.event for r in records if isinstance(r.event, ev.SeedGerminated)]
    assert seeds, "the heuristic grew no seed: the report would have no alpha curves to check"

    # Curves: train and val, the final test point, and the all-seeds-off reference when measured.
    names = ["train", "val", "test"] + (["all_off"] if any(e.all_off_acc is not None for e in epochs) else [])
    curves = series(doc.svgs, "curve-r0-")
    assert sorted(curves) == sorted(f"curve-r0-e0-k0-{n}_{k}" for n in names for k in ("acc", "loss"))
    val = curves["curve-r0-e0-k0-val_acc"].find(f"{{{SVG_NS}}}path").get("d")
    assert len(re.findall(r"[ML] ", val)) == len(epochs), "one vertex per epoch"

    # Swimlanes: one lane per enabled slot, one segment per stage the slot spent time in.
    started = next(r.event for r in records if isinstance(r.event, ev.EpisodeStarted))
    lanes = series(doc.svgs, "lane-r0-")
    assert sorted(lanes) == sorted(f"lane-r0-e0-k0-{s}" for s in started.slots_enabled)
    last = epochs[-1].epoch
    for slot in started.slots_enabled:
        changes = [(0, Stage.DORMANT)] + [(r.event.epoch, r.event.to_stage) for r in records
                                          if isinstance(r.event, ev.StageChanged) and r.event.slot == slot]
        segments = sum(1 for (a, stage), (b, _) in zip(changes, changes[1:] + [(last, None)])
                       if stage != Stage.DORMANT and b > a)
        assert len(lanes[f"lane-r0-e0-k0-{slot}"].findall(f".//{{{SVG_NS}}}path")) == segments, slot
    markers = series(doc.svgs, "marker-r0-")
    assert "marker-r0-germinate" in markers
    germinate_marks = markers["marker-r0-germinate"].findall(f".//{{{SVG_NS}}}use")
    assert len(germinate_marks) == len(seeds)
    if any(isinstance(r.event, ev.SeedFossilized) for r in records):
        assert "marker-r0-fossilize" in markers

    # One alpha curve per seed; parameters over time.
    assert sorted(series(doc.svgs, "alpha-r0-")) == sorted(
        f"alpha-r0-e0-k0-{s.seed_id.replace('#', '_')}" for s in seeds)
    assert list(series(doc.svgs, "params-r0-")) == ["params-r0-e0-k0"]

    # Tables: seeds, gate verdicts (one row per verdict), decisions.
    verdicts = [r for r in records if isinstance(r.event, ev.GateEvaluated)]
    assert "<h3>Gate verdicts</h3>" in text and "<h3>Seeds</h3>" in text and "<h3>Decisions</h3>" in text
    section = text.split("<h3>Gate verdicts</h3>")[1].split("<h3>")[0]
    assert section.count("<tr>") == len(verdicts) + 1
    for seed in seeds:
        assert f"<td>{seed.seed_id}</td>" in text


def test_the_report_is_self_contained(runs, tmp_path):
    text = render(tmp_path, runs / "heuristic")
    doc = Document(text)
    assert "script" not in doc.tags and "<script" not in text.lower()
    assert "iframe" not in doc.tags and "link" not in doc.tags and "img" not in doc.tags
    assert set(re.findall(r"https?://[^\s\"'<>)]*", text)) == {SVG_NS}
    assert "xlink" not in text and "@import" not in text
    ids = re.findall(r'\bid="([^"]+)"', text)
    assert len(ids) == len(set(ids)), "ids are unique across the inline figures"


def test_the_same_log_gives_the_same_report(runs, tmp_path):
    first = report.build([runs / "heuristic"], generated_at="2020-01-01T00:00:00Z")
    second = report.build([runs / "heuristic"], generated_at="2030-06-01T12:00:00Z")
    assert first != second
    strip = re.compile(r'<p class="generated">[^\n]*\n')
    assert strip.sub("", first) == strip.sub("", second)
    a = render(tmp_path, runs / "heuristic")
    (tmp_path / "report.html").unlink()
    b = render(tmp_path, runs / "heuristic")
    assert strip.sub("", a) == strip.sub("", b)


def test_several_runs_are_compared(runs, tmp_path):
    text = render(tmp_path, runs)  # a directory of run directories
    doc = Document(text)
    assert "<h2>Comparison</h2>" in text
    assert sorted(series(doc.svgs, "compare-")) == ["compare-heuristic", "compare-none"]
    assert sorted(series(doc.svgs, "lane-r")) == sorted(f"lane-r{r}-e0-k0-{s}" for r in (0, 1)
                                                       for s in ("early", "mid", "late"))


def test_a_torn_log_reports_its_committed_part(runs, tmp_path):
    data = (runs / "none" / "events.elog").read_bytes()
    torn = tmp_path / "torn.elog"
    torn.write_bytes(data[: len(data) * 2 // 3])
    text = render(tmp_path, torn)
    assert "tail torn" in text and "curve-r0-e0-k0-val_acc" in text
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "missing"), "-o", str(tmp_path / "x.html")])
    assert result.exit_code == 2 and result.stderr.startswith("esper: error:")
