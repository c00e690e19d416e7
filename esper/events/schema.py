"""The JSON Schema of the envelope and every event, generated from the msgspec types (events §9)."""

import json
from pathlib import Path
from typing import Any

import msgspec

from esper.events.envelope import SCHEMA_VERSION, Record

SCHEMA_FILE = "events.schema.json"


def build_schema() -> dict[str, Any]:
    body = msgspec.json.schema(Record)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Esper event log record",
        "x-esper-schema-version": SCHEMA_VERSION,
        **body,
    }


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, indent=2) + "\n"


def first_difference(old: Any, new: Any, path: str = "$") -> str | None:
    """The JSON path of the first place two documents differ, or None when they are equal."""
    if type(old) is not type(new):
        return path
    if isinstance(old, dict):
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                return f"{path}.{key}"
            found = first_difference(old[key], new[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(old, list):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None if len(old) == len(new) else f"{path}[{min(len(old), len(new))}]"
    return None if old == new else path


def check(directory: Path) -> str | None:
    """None when the checked-in schema matches the code; else a one-line explanation."""
    path = directory / SCHEMA_FILE
    if not path.exists():
        return f"{path} is missing (run 'esper schemas')"
    stored = json.loads(path.read_text())
    current = build_schema()
    where = first_difference(stored, current)
    if where is None:
        return None
    stored_body = {k: v for k, v in stored.items() if k != "x-esper-schema-version"}
    current_body = {k: v for k, v in current.items() if k != "x-esper-schema-version"}
    if stored_body != current_body and stored.get("x-esper-schema-version") == SCHEMA_VERSION:
        return (
            f"{path} is stale at {where}, and the schema body changed while SCHEMA_VERSION stayed "
            f"{SCHEMA_VERSION} (bump it in esper/events/envelope.py, then run 'esper schemas')"
        )
    return f"{path} is stale at {where} (run 'esper schemas')"


def write(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SCHEMA_FILE
    path.write_text(render(build_schema()))
    return path
