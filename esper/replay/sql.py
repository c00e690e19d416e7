"""A user's SQL over the loaded logs (events spec §8): reading statements only, results formatted
as a table, CSV or JSON.

The statement type is checked before anything runs, so a write never starts; the connection also
refuses file access (see `loader.connect`). Errors become one line, never a DuckDB traceback.
"""

import csv
import datetime
import gc
import io
import re
from decimal import Decimal

import duckdb
import msgspec

FORMATS = ("table", "csv", "json")
READING = "SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN"
# Every relation a user can query, with its columns: what `esper sql --views` prints.
VIEWS_QUERY = (
    "SELECT table_name AS view, column_name AS column, data_type AS type FROM information_schema.columns "
    "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
)
_EXPLAIN = re.compile(r"\s*explain(\s+analyze)?\s", re.IGNORECASE)
_CELL_WIDTH = 80  # the table format cuts longer cells; csv and json keep them whole
_json = msgspec.json.Encoder(decimal_format="number")


class QueryError(Exception):
    """A statement that may not run, or a SQL error, as one line."""


class Result(msgspec.Struct, frozen=True):
    columns: list[str]
    rows: list[tuple]


def one_line(exc: Exception) -> str:
    """DuckDB's first line says what is wrong; the rest is a caret diagram."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def reading_statements(con: duckdb.DuckDBPyConnection, sql: str) -> list:
    """The parsed statements of `sql`, all of them checked before any runs. DESCRIBE, SHOW,
    SUMMARIZE and WITH parse as SELECT; EXPLAIN is checked on the statement it explains, since
    EXPLAIN ANALYZE executes it."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(one_line(exc)) from None
    if not statements:
        raise QueryError("no SQL statement given")
    for statement in statements:
        kind = statement.type
        if kind == duckdb.StatementType.EXPLAIN:
            kind = _explained_type(con, statement.query)
        if kind != duckdb.StatementType.SELECT:
            raise QueryError(f"only reading statements run ({READING}); this is {statement.type.name}: "
                             f"{_preview(statement.query)}")
    return statements


def _explained_type(con: duckdb.DuckDBPyConnection, query: str) -> duckdb.StatementType:
    """The type of the statement an EXPLAIN wraps; EXPLAIN itself when that is not clear."""
    explained = _EXPLAIN.match(query)
    try:
        inner = con.extract_statements(query[explained.end():]) if explained else []
    except duckdb.Error:
        inner = []
    return inner[0].type if len(inner) == 1 else duckdb.StatementType.EXPLAIN


def run(con: duckdb.DuckDBPyConnection, sql: str) -> list[Result]:
    """Every statement of `sql`, each fetched fully."""
    return [execute(con, statement) for statement in reading_statements(con, sql)]


def execute(con: duckdb.DuckDBPyConnection, statement) -> Result:
    """One statement this module wrote or checked; never user text formatted into SQL.

    The rows are fetched with the cycle collector paused: they are plain values, with no cycle to
    find, and on a large result its repeated passes over the growing rows took 60% of the fetch."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        rows = con.execute(statement).fetchall()
    except duckdb.Error as exc:
        raise QueryError(one_line(exc)) from None
    finally:
        if collecting:
            gc.enable()
    return Result([d[0] for d in con.description or ()], rows)


def render(result: Result, fmt: str) -> str:
    return {"table": _table, "csv": _csv, "json": _json_rows}[fmt](result)


def _preview(query: str) -> str:
    text = " ".join(query.split())
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value) -> str:
    """A cell as text: SQL spellings for NULL and booleans, JSON for nested values."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict, tuple)):
        return _json.encode(value).decode()
    if isinstance(value, datetime.datetime):
        return value.isoformat(sep=" ")
    return str(value)


def _table(result: Result) -> str:
    cells = [[_cut(_text(v)) for v in row] for row in result.rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(result.columns)]
    numeric = [all(isinstance(row[i], (int, float, Decimal)) and not isinstance(row[i], bool)
                   for row in result.rows if row[i] is not None) for i in range(len(result.columns))]

    def line(values: list[str]) -> str:
        return " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    out = [line(result.columns), "-+-".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    out.append(f"({len(cells)} row{'' if len(cells) == 1 else 's'})")
    return "\n".join(out)


def _cut(text: str) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 3] + "..."


def _csv(result: Result) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.columns)
    writer.writerows(["" if v is None else _text(v) for v in row] for row in result.rows)
    return out.getvalue().rstrip("\n")


def _json_rows(result: Result) -> str:
    """A JSON array with one object per row, one row per line; non-finite floats are null."""
    if not result.rows:
        return "[]"
    return "[\n" + ",\n".join(_json.encode(dict(zip(result.columns, row))).decode() for row in result.rows) + "\n]"
