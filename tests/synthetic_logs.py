"""benchmarks/synthetic_log.py for tests: realistic multi-env logs written by the real decider and
log writer, without training anything."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "synthetic_log", Path(__file__).parent.parent / "benchmarks" / "synthetic_log.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

write_run = _module.write_run
