"""`esper run --nproc N` (runtime §5.3): torchrun's launcher starts N local `esper run --backend ddp`."""

import logging
import sys
import uuid


def launch(nproc: int, args: list[str]) -> int:
    """Run `python -m esper run ARGS` on `nproc` local processes; returns rank 0's exit code (or, when
    a signal ended it, 3: the run failed because a peer did)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    # The workers print their own one-line errors; the launcher's report of them would repeat it.
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "esper", "run", *args)
    except ChildFailedError as error:
        failure = error.failures.get(0)
        if failure is None or failure.exitcode <= 0:
            failure = error.get_first_failure()[1]
        return failure.exitcode if failure.exitcode > 0 else 3
    finally:
        agent_log.setLevel(level)
    return 0
