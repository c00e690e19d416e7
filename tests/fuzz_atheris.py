"""An atheris target over the three parsers of tests/fuzz_targets.py (run by tests/test_fuzz.py when
atheris is installed; by hand: `python tests/fuzz_atheris.py -runs=100000`).

The first input byte picks the target: the log reader (on the bytes as they are, or after a valid
header), the config loader, a `--set` assignment, or the command decoder. Any exception that is not
one of the target's documented errors is a finding: atheris prints it and saves the input.
"""

import sys

import atheris

with atheris.instrument_imports(include=["esper", "fuzz_targets"]):
    import fuzz_targets as targets
    from esper.events.log_format import header_bytes

SCRATCH = targets.Scratch()
HEADER = header_bytes()


def one_input(data: bytes) -> None:
    if not data:
        return
    kind, rest = data[0] % 5, data[1:]
    if kind == 0:
        targets.read_log(SCRATCH, rest)
    elif kind == 1:
        targets.read_log(SCRATCH, HEADER + rest)
    elif kind == 2:
        targets.load_config(SCRATCH, rest)
    elif kind == 3:
        targets.parse_assignment(rest.decode("utf-8", "replace"))
    else:
        targets.decode(rest)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
