"""`esper ARGS` run in this process through the real entry point, exit-code mapping included."""

import contextlib
import io
import sys

from esper.cli.main import main


def esper(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `esper ARGS`."""
    argv, sys.argv = sys.argv, ["esper", *args]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()
