"""`esper run --nproc N` (runtime §5.3) and `esper train-policy --nproc N` (policy §7.4): torchrun's
launcher starts N local processes of the same command."""

import logging
import sys
import uuid


def launch(nproc: int, args: list[str], command: str = "run") -> int:
    """Run `python -m esper COMMAND ARGS` on `nproc` local processes; returns rank 0's exit code (or,
    when a signal ended it, 3: the run failed because a peer did; 130 when the launcher itself was
    interrupted, once the workers, interrupted too, stopped)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    # The workers print their own one-line errors; the launcher's report of them would repeat it.
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "esper", command, *args)
    except ChildFailedError as error:
        failure = error.failures.get(0)
        if failure is None or failure.exitcode <= 0:
            failure = error.get_first_failure()[1]
        return failure.exitcode if failure.exitcode > 0 else 3
    except SignalException:
        return 130
    finally:
        agent_log.setLevel(level)
    return 0
