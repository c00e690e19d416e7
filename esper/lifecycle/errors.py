"""Typed refusals of the decider and the error a damaged log gives when folded."""

from typing import Any


class DomainError(Exception):
    """An invalid command. `code` is stable and machine-readable; nothing was emitted."""

    def __init__(self, code: str, message: str, **details: Any):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.details = code, message, details


class ReplayError(Exception):
    """A record `evolve` cannot apply: found only in damaged or foreign logs."""

    def __init__(self, seq: int | None, reason: str):
        super().__init__(f"record {seq}: {reason}")
        self.seq, self.reason = seq, reason
