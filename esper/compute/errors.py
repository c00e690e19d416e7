"""Failures of the compute side that the command line reports as one line (runtime §7.7)."""


class SetupError(ValueError):
    """The run cannot be set up as asked (precision for the device, launcher, world size): exit 2."""


class CompileError(RuntimeError):
    """torch.compile failed; the run stops rather than falling back to eager (runtime §3.5): exit 3."""


class PeerLost(RuntimeError):
    """A data-parallel rank failed, timed out or disagrees with rank 0 (runtime §5.3): exit 3."""
