"""torch.compile for one model instance (runtime §3.5).

The pieces that carry the work are compiled: each host block, and each seed module when it is
germinated. The slot logic between them (mode, isolation, alpha blend, overrides, capture) stays
eager, so stage changes, alpha ramps and counterfactual overrides never recompile anything; only a
new seed adds graphs, and each piece compiles to a few variants (train or eval mode, static or
dynamic batch size). Compiled forwards are attributes of this model's modules, never module-level
functions, and a compile failure is an error, never a silent fallback to eager.
"""

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from esper.compute.errors import CompileError

# Dynamo keys its cache by code object, and every compiled piece shares the one `forward` closure
# below, so the limit counts the variants of all pieces together (a few per piece). Past the limit
# Dynamo would quietly run eager; here that is an error instead.
RECOMPILE_LIMIT = 256


class Compiler:
    """Compiles the pieces of one model and counts the graphs it has compiled."""

    def __init__(self, backend: str = "inductor"):
        self.backend = backend
        self.graphs = 0

    def _compile_graph(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.backend)(graph, example_inputs)

    def compile(self, module: nn.Module) -> None:
        """Replace this instance's forward by a compiled one; its state dict is unchanged."""
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return original(*args, **kwargs)

        module.forward = torch.compile(forward, backend=self._compile_graph)

    def compile_host(self, host: nn.Module) -> None:
        for block in host.blocks:
            self.compile(block)


@contextmanager
def compiled_pass() -> Iterator[None]:
    """Around every pass of a compiled model: compilation happens lazily inside its forwards and
    backwards, under these settings, and its failures become one line."""
    # Imported here: loading Dynamo and Inductor costs a second, which runs without --compile skip.
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException
    from torch._inductor.exc import InductorError

    # The leak check backpropagates through the first batch's graph twice (retain_graph), which a
    # backward that donated its buffers to save memory refuses.
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True), \
                torch._functorch.config.patch(donated_buffer=False):
            yield
    except (TorchDynamoException, FailOnRecompileLimitHit, InductorError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[0][:300] if lines else type(error).__name__
        raise CompileError(f"torch.compile failed: {reason} (run without --compile)") from None
