"""Validation with fused counterfactuals (runtime §3.3).

Each configuration is the model with some slots' alphas overridden: `main` (none), one ablation per
blended slot (alpha 0), one shadow per TRAINING slot (alpha 1) and `all_off`. Fused execution runs
them as one forward over the batch replicated once per configuration, with per-sample alpha vectors;
sequential execution runs them one after another. Both give the same numbers (tested). Under data
parallelism each rank evaluates its share of the batches; the sums come back `Pending`, to be
reduced with the rest of the epoch's.
"""

import time
from typing import Callable, Iterable

import attrs
import torch

from esper.compute.backend import Evaluation
from esper.compute.slot import GrowingModel
from esper.compute.precision import autocast
from esper.compute.sums import Pending, synchronize
from esper.compute.training import loss_and_correct


@attrs.frozen
class Configuration:
    name: str
    overrides: tuple[tuple[str, float], ...]  # (slot, alpha) pairs


def evaluate(
    model: GrowingModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    configurations: list[Configuration],
    *,
    device: torch.device,
    amp: str,
    fused: bool,
    score: Callable[[float, float], float],
) -> Pending:
    """Every configuration over the same batches; finishes into (evaluations by configuration name,
    forward passes, seconds)."""
    started = time.perf_counter()
    model.eval()
    k = len(configurations)
    loss = torch.zeros(k, device=device)
    correct = torch.zeros(k, device=device)
    count = 0
    passes = 0
    # Fusing needs the override to reproduce a slot's own output in the rows that leave it alone;
    # a gated blend's alpha depends on its input, so slots with a gate run sequentially.
    overridden = {s for c in configurations for s, _ in c.overrides}
    fused = fused and k > 1 and not any(model.slots[s].gate is not None for s in overridden)
    with torch.no_grad(), autocast(device, amp):
        for x, y in batches:
            n = y.numel()
            if fused:
                rows = x.shape[0]
                xs = x.repeat(k, *([1] * (x.dim() - 1)))
                alpha = {}
                for s in overridden:
                    own = float(model.slots[s].alpha) if model.slots[s].mode != "incubate" else 0.0
                    own = 1.0 if model.slots[s].mode == "fused" else own
                    per_config = torch.tensor([dict(c.overrides).get(s, own) for c in configurations],
                                              device=device)
                    alpha[s] = per_config.repeat_interleave(rows)
                logits = model(xs, alpha_override=alpha).reshape(k, rows, *([] if y.dim() == 1 else [y.shape[1]]), -1)
                for i in range(k):
                    l, c, _ = loss_and_correct(logits[i], y)
                    loss[i] += l
                    correct[i] += c
                passes += 1
            else:
                for i, config in enumerate(configurations):
                    override = {s: torch.tensor(a, device=device) for s, a in config.overrides}
                    l, c, _ = loss_and_correct(model(x, alpha_override=override or None), y)
                    loss[i] += l
                    correct[i] += c
                    passes += 1
            count += n
    packed = torch.cat([loss, correct, torch.tensor([float(count), float(passes)], device=device)]).double()
    synchronize(device)
    seconds = time.perf_counter() - started

    def finish(values: list[float], world: int) -> tuple[dict[str, Evaluation], int, float]:
        losses, corrects, total = values[:k], values[k:2 * k], int(values[2 * k])
        results = {
            config.name: Evaluation(loss=losses[i] / total, score=score(losses[i] / total, corrects[i] / total),
                                    examples=total, next_token_acc=100.0 * corrects[i] / total)
            for i, config in enumerate(configurations)
        }
        return results, int(values[2 * k + 1]), seconds

    return Pending(packed, finish)
