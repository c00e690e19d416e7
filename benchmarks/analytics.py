"""Analytics over a million events (events spec §8): load into DuckDB, the README's five questions,
and replay, all on the same synthetic logs (many runs, seeds and gate verdicts, written by the real
decider; see synthetic_log.py).

Targets on 2 cores: load >= 500,000 events/s, every question < 0.5 s, replay >= 300,000 events/s.
A question is timed as `esper sql` runs it, through `esper.replay.sql.run`: checked, executed
and fetched fully into Python rows (and, for comparison, with its result kept inside DuckDB);
each runs REPEATS times and the median is reported. The load average is printed too, since other
work on the same cores slows every figure.
Run: `.venv/bin/python benchmarks/analytics.py [N]`; the last line is
`RESULT load_events_per_s=<n> replay_events_per_s=<n> slowest_query_s=<s>`.
"""

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from synthetic_log import write_logs

from esper.events.log import LogReader
from esper.lifecycle.fold import fold
from esper.replay.loader import connect
from esper.replay.sql import run
from esper.replay.views import QUESTIONS

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
REPEATS = 3


def timed(f):
    start = time.perf_counter()
    value = f()
    return value, time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        paths, written_s = timed(lambda: write_logs(Path(d), N))
        print(f"wrote {len(paths)} logs in {written_s:.1f} s; load average {os.getloadavg()[0]:.2f}")

        con, load_s = timed(lambda: connect([d]))
        events = con.execute("SELECT count(*) FROM raw_events").fetchall()[0][0]
        load = events / load_s
        print(f"load into DuckDB: {events:,} events in {load_s:.2f} s = {load:,.0f} events/s (target >= 500,000)")

        slowest = 0.0
        for name, sql in QUESTIONS.items():
            runs = [timed(lambda: run(con, sql)) for _ in range(REPEATS)]
            seconds, rows = statistics.median(s for _, s in runs), len(runs[0][0][0].rows)
            del runs  # kept, a large answer would slow every later garbage collection (the replay's too)
            # The same query kept inside DuckDB, to show what turning rows into Python objects costs.
            inside = statistics.median(timed(lambda: con.execute(f"CREATE OR REPLACE TEMP TABLE answer AS {sql}")
                                             .fetchall())[1] for _ in range(REPEATS))
            slowest = max(slowest, seconds)
            print(f"  {name}: {seconds:.3f} s ({rows:,} rows; {inside:.3f} s without fetching them)")
        print(f"slowest question {slowest:.3f} s (target < 0.5)")

        replayed, replay_s = timed(lambda: sum(fold(LogReader(p).records()).records for p in paths))
        replay = replayed / replay_s
        print(f"replay (read, decode, fold every log): {replay:,.0f} events/s (target >= 300,000); "
              f"load average {os.getloadavg()[0]:.2f}")
    print(f"RESULT load_events_per_s={load:.0f} replay_events_per_s={replay:.0f} slowest_query_s={slowest:.3f}")


if __name__ == "__main__":
    main()
