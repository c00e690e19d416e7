"""How `esper run` and `esper train-policy` report what stops a training (runtime §7.7): user
errors in one line with exit 2, failures of the run itself in one line with exit 3."""

from contextlib import contextmanager
from typing import Iterator

from esper.cli.errors import RunFailed, UserError
from esper.compute.checkpoints import CheckpointWriteError
from esper.compute.engine import GovernorExhausted
from esper.compute.errors import CompileError, PeerLost, SetupError
from esper.events.log_errors import LogError, LogFsyncError, UnknownEventType
from esper.policy.run_config import ConfigError
from esper.policy.runner import RunError
from esper.tasks.errors import DataError


@contextmanager
def reported(command: str, what: str) -> Iterator[None]:
    """`command` names the CLI command for the resume hint, `what` the thing resumed."""
    try:
        yield
    except LogFsyncError as error:
        raise RunFailed(f"{error} (free some space, or check the disk, then resume the {what})") from None
    except CheckpointWriteError as error:
        raise RunFailed(f"{error} (free some space, then resume the {what}: esper {command} --resume "
                        f"{error.path.parent.parent})") from None
    except (ConfigError, DataError, RunError, LogError, UnknownEventType, SetupError) as error:
        raise UserError(str(error)) from None
    except (CompileError, PeerLost) as error:
        raise RunFailed(str(error)) from None
    except GovernorExhausted as error:
        raise RunFailed(f"{error} (lower the learning rate or disable the governor with --set governor.enabled=false)")
    except OSError as error:
        raise RunFailed(f"{error} (free some space or choose another --out)") from None
