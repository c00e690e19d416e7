"""Reading logs back: folding, verification, re-runs, forks, DuckDB views and reports."""

from esper.replay.loader import connect

__all__ = ["connect"]
