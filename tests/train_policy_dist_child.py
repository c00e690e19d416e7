"""One torchrun worker of `esper`, with a fault on rank 1 at its 8th step (mid round 2) chosen by
ESPER_TEST_FAULT (tests/test_train_policy_dist.py).

`lost`: rank 1 dies at once, as a killed process does. `stall`: rank 1 stops answering, so rank 0
waits in its next collective until `dist.timeout_s`; the launcher's SIGTERM then ends rank 1.
"""

import os
import signal
import threading

from esper.cli.main import main
from esper.policy.trainer import PolicyTrainer

FAULT_STEP = 8


def fault_at_step(fault: str) -> None:
    act = PolicyTrainer._act

    def faulty(self, observations):
        if self.steps == FAULT_STEP:
            if fault == "lost":
                os._exit(1)
            signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
            threading.Event().wait()
        act(self, observations)

    PolicyTrainer._act = faulty


if os.environ.get("RANK") == "1" and os.environ.get("ESPER_TEST_FAULT"):
    fault_at_step(os.environ["ESPER_TEST_FAULT"])
main()
