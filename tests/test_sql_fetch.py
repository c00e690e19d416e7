"""`esper.replay.sql.execute` fetches with the cycle collector paused (a large result fetched with it
running took 2.5 times as long); the collector's state is restored however the statement ends."""

import gc

import duckdb
import pytest

from esper.replay.sql import QueryError, execute


@pytest.fixture
def con():
    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT range AS i, [range::VARCHAR] AS l FROM range(5000)").fetchall()
    return con


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_left_as_it_was(con, enabled):
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        result = execute(con, "SELECT i, l FROM t ORDER BY i")
        assert gc.isenabled() is enabled
        assert result.columns == ["i", "l"] and result.rows == con.execute("SELECT i, l FROM t ORDER BY i").fetchall()
        with pytest.raises(QueryError):
            execute(con, "SELECT nope FROM t")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
