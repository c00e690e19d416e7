"""Reading a log: never modifies a file, stops at the last complete batch (events spec §5.3)."""

from pathlib import Path

from esper.events.log_errors import LogError
from esper.events.log_format import HEADER_SIZE, check_header
from esper.events.log_scan import LogSummary, RecordStream


class LogReader:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(HEADER_SIZE)
        except OSError as exc:
            raise LogError(f"cannot open log {self.path}: {exc.strerror}") from None
        check_header(self.path, head)

    def records(self, start_seq: int = 0) -> RecordStream:
        """Records with seq >= start_seq, streamed; the stream's `summary` is set once it is exhausted.
        Payloads before `start_seq` are not decoded, so an unknown event type there goes unreported."""
        return RecordStream(self.path, start_seq)

    def scan(self) -> LogSummary:
        """Decode everything (so unknown event types are reported) and summarise."""
        stream = RecordStream(self.path)
        for _ in stream:
            pass
        return stream.summary
