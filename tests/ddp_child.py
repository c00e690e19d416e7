"""One torchrun worker of `esper`, with a fault on rank 1 chosen by ESPER_TEST_FAULT (tests/test_ddp.py).

`ratio`: rank 1 measures its seeds' gradient norms 100 times too large, so the ranks' gradient
ratios disagree. `diverge`: rank 1 nudges a parameter just before each replica check.
"""

import os

from esper.cli.main import main
from esper.compute import data_parallel, training
from esper.compute.slot import GrowingModel


def inflate_seed_norms() -> None:
    host_ids: set[int] = set()
    host_parameters, norm = GrowingModel.host_parameters, training._norm

    def recorded(self):
        params = host_parameters(self)
        host_ids.update(id(p) for p in params)
        return params

    def inflated(params, device):
        value, n = norm(params, device)
        return (value * 100 if params and id(params[0]) not in host_ids else value), n

    GrowingModel.host_parameters, training._norm = recorded, inflated


def nudge_before_checks() -> None:
    verify = data_parallel.DataParallel.verify

    def nudged(self, model, epoch):
        with training.torch.no_grad():
            model.host.head.bias.add_(1e-3)
        verify(self, model, epoch)

    data_parallel.DataParallel.verify = nudged


if os.environ.get("RANK") == "1":
    {"ratio": inflate_seed_norms, "diverge": nudge_before_checks}[os.environ["ESPER_TEST_FAULT"]]()
main()
