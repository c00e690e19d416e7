"""What the fuzzers feed (tests/test_fuzz.py with hypothesis, tests/fuzz_atheris.py with atheris):
the log reader, the config loader and the command decoder, each on arbitrary bytes. Each target
swallows the errors it documents and lets anything else escape, which the fuzzer reports.

  - log reader (`LogReader(path)`, `.scan()`, `.records()`): `LogError` (LogHeaderError,
    LogCorruptError, ...) and `UnknownEventType`;
  - config loader (`read_file` then `resolve`, and `parse_set`): `ConfigError`, and `DataError`
    for an unknown task (`run.task` names the task whose defaults apply);
  - command decoder (`decode_command`): `msgspec.ValidationError` and `msgspec.DecodeError`.
"""

import os
import tempfile
from pathlib import Path

import msgspec

from esper.events.log_errors import LogError, UnknownEventType
from esper.events.log_reader import LogReader
from esper.lifecycle.commands import decode_command
from esper.policy import run_config
from esper.tasks.errors import DataError

LOG_ERRORS = (LogError, UnknownEventType)
CONFIG_ERRORS = (run_config.ConfigError, DataError)
COMMAND_ERRORS = (msgspec.ValidationError, msgspec.DecodeError)


class Scratch:
    """One temporary directory reused for every example (a file per example would be slow)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="esper-fuzz-")
        self.path = Path(self._dir.name)

    def file(self, name: str, data: bytes) -> Path:
        path = self.path / name
        with open(path, "wb") as f:
            f.write(data)
        return path

    def close(self) -> None:
        self._dir.cleanup()


def read_log(scratch: Scratch, data: bytes) -> str:
    """Returns what happened: 'ok' or the documented error's name."""
    path = scratch.file("events.elog", data)
    try:
        summary = LogReader(path).scan()
        stream = LogReader(path).records()
        seqs = [r.seq for r in stream]
        assert seqs == list(range(len(seqs))), "a reader yielded a gap"
        assert stream.summary.records == summary.records == len(seqs)
        assert summary.tail in ("clean", "torn")
        assert os.path.getsize(path) == len(data), "a reader modified the file"
        return "ok"
    except LOG_ERRORS as exc:
        assert len(str(exc).splitlines()) == 1, f"not a one-line message: {exc!r}"
        return type(exc).__name__


def load_config(scratch: Scratch, data: bytes) -> str:
    path = scratch.file("config.toml", data)
    try:
        run_config.resolve(run_config.read_file(path))
        return "ok"
    except CONFIG_ERRORS as exc:
        assert len(str(exc).splitlines()) == 1, f"not a one-line message: {exc!r}"
        return type(exc).__name__


def resolve_layer(layer: dict) -> str:
    try:
        run_config.resolve(layer)
        return "ok"
    except CONFIG_ERRORS as exc:
        assert len(str(exc).splitlines()) == 1, f"not a one-line message: {exc!r}"
        return type(exc).__name__


def parse_assignment(text: str) -> str:
    try:
        run_config.resolve(run_config.parse_set(text))
        return "ok"
    except CONFIG_ERRORS as exc:
        assert len(str(exc).splitlines()) == 1, f"not a one-line message: {exc!r}"
        return type(exc).__name__


def decode(data: bytes) -> str:
    try:
        decode_command(data)
        return "ok"
    except COMMAND_ERRORS as exc:
        return type(exc).__name__
