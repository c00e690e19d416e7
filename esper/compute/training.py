"""One training pass (runtime §3.2) with the lifecycle's gradient statistics (lifecycle §4.3–4.4).

Sums accumulate on the device and stay there: the pass hands them back `Pending`, and the epoch
reads them together with validation's. Under data parallelism (runtime §5.3) the same pass runs on
every rank over its shard, through the wrapper that averages gradients.
"""

import math
import time
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F

from esper.compute.backend import SeedGradients, TrainStats
from esper.compute.optimizer import prime_momentum
from esper.compute.precision import autocast
from esper.compute.slot import GrowingModel, count_leaks
from esper.compute.sums import Pending, synchronize


class Collective(Protocol):
    """What a pass needs from the other ranks; None in one process."""

    def average(self, tensors: list[torch.Tensor]) -> None:
        """Average the tensors across ranks, in place."""


def loss_and_correct(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed fp32 cross-entropy and correct count, over samples (CNN) or every position (LM)."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    loss = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(dim=-1) == targets).sum()
    return loss, correct, targets.numel()


def _norm(params: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, int]:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device), 0
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))), sum(g.numel() for g in grads)


def _incubation_gradient(model: GrowingModel, slot: str, params: list[torch.Tensor], x: torch.Tensor,
                         y: torch.Tensor, device: torch.device, amp: str,
                         scaler: torch.amp.GradScaler | None) -> None:
    """A TRAINING seed learns from the loss of the model with its output in place of the host's
    features (alpha forced to 1), and from nothing else.

    The straight-through estimator alone hands the seed dL/dh measured where the seed is absent, a
    linear objective it never feels the effect of: measured on digits, its shadow gain rose to
    +1.5 pp and then fell without bound (-70 pp after 15 epochs), so G2 could never pass. This pass
    replaces that gradient. It runs in eval mode so the host's running statistics keep no trace of
    it, and asks autograd for the seed's parameters only, so no host parameter gets a gradient.
    """
    was_training = model.training
    model.eval()
    with autocast(device, amp):
        logits = model(x, alpha_override={slot: torch.ones((), device=device)})
    loss, _, n = loss_and_correct(logits, y)
    loss = loss / n
    grads = torch.autograd.grad(scaler.scale(loss) if scaler else loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        p.grad = g
    model.train(was_training)


def train_pass(
    model: GrowingModel,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    amp: str,
    scaler: torch.amp.GradScaler | None,
    ratio_slots: tuple[str, ...],
    incubating: tuple[str, ...],
    leak_slots: tuple[str, ...],
    stride: int,
    eps: float,
    grad_clip: float,
    before_step: Callable[[], None],
    score: Callable[[float, float], float],
    net: Callable[..., torch.Tensor] | None = None,
    collective: Collective | None = None,
) -> Pending:
    """The pass's sums, finished into TrainStats once reduced. `net` runs the training forward
    (default: the model itself; the data-parallel wrapper under `ddp`), `collective` joins the other
    ranks (None: one process)."""
    started = time.perf_counter()
    forward = net if net is not None else model
    model.train()
    prime_momentum(optimizer)
    host_params = model.host_parameters()
    seed_params = {s: model.slots[s].seed_parameters() for s in model.slots if model.slots[s].seed is not None}
    trained = host_params + [p for ps in seed_params.values() for p in ps]
    zero = torch.zeros((), device=device)
    loss_sum, correct_sum, count, measured, bad = (zero.clone() for _ in range(5))
    ratio_sum = {s: zero.clone() for s in ratio_slots}
    seed_norm_sum = {s: zero.clone() for s in ratio_slots}
    host_norm_sum = zero.clone()
    leaks: dict[str, int] = {}
    for index, (x, y) in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        capture: dict[str, torch.Tensor] | None = {} if index == 0 and leak_slots else None
        with autocast(device, amp):
            logits = forward(x, capture=capture)
        loss, correct, n = loss_and_correct(logits, y)
        if capture is not None:
            leaks = {s: count_leaks(capture[s], host_params) for s in leak_slots if s in capture}
        mean_loss = loss / n
        # Nothing below reads a value back to the host: a batch that must not step is skipped on
        # the device, so the host queues the next batch while the device still runs this one.
        finite_loss = torch.isfinite(mean_loss)
        (scaler.scale(mean_loss) if scaler else mean_loss).backward()
        for slot in incubating:
            _incubation_gradient(model, slot, seed_params[slot], x, y, device, amp, scaler)
        if collective is not None and incubating:
            # The incubation pass runs outside the wrapper, so its gradients are averaged here.
            collective.average([p.grad for s in incubating for p in seed_params[s] if p.grad is not None])
        if scaler:
            scaler.unscale_(optimizer)  # the scaler skips an overflowing step itself; no epoch mark
        finite_grads = _finite_gradients(trained, device)
        if scaler:
            bad += ~finite_loss
        else:
            # A non-finite loss makes every gradient non-finite, so on every rank (gradients are
            # averaged) the same batches skip their step.
            optimizer.found_inf = (~finite_grads).float()
            bad += ~(finite_loss & finite_grads)
        if ratio_slots and index % stride == 0:
            host_norm, n_host = _norm(host_params, device)
            host_norm_sum += torch.where(finite_grads, host_norm, zero)
            for s in ratio_slots:
                seed_norm, n_seed = _norm(seed_params.get(s, []), device)
                seed_norm_sum[s] += torch.where(finite_grads, seed_norm, zero)
                if n_seed and n_host:
                    rms_ratio = (seed_norm / math.sqrt(n_seed)) / (host_norm / math.sqrt(n_host) + eps)
                    ok = finite_grads & (seed_norm >= eps) & (host_norm >= eps)
                    ratio_sum[s] += torch.where(ok, rms_ratio, zero)
            measured += finite_grads
        if grad_clip > 0:
            # Host and each seed separately: joint clipping lets the host starve a seed.
            torch.nn.utils.clip_grad_norm_(host_params, grad_clip)
            for params in seed_params.values():
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
        before_step()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        loss_sum += torch.where(finite_loss, loss.detach(), zero)
        correct_sum += torch.where(finite_loss, correct, zero)
        count += torch.where(finite_loss, float(n), 0.0)
    finite = {s: torch.stack([torch.isfinite(p).all() for p in ps]).all() if ps
              else torch.ones((), dtype=torch.bool, device=device) for s, ps in seed_params.items()}
    names = list(ratio_slots)
    counts = torch.stack([count, bad, measured]
                         + [torch.tensor(float(leaks.get(s, 0)), device=device) for s in leak_slots])
    packed = torch.cat([
        torch.stack([loss_sum, correct_sum, host_norm_sum] + [ratio_sum[s] for s in names]
                    + [seed_norm_sum[s] for s in names] + [finite[s].float() for s in finite]),
        counts,
    ]).double()
    synchronize(device)
    seconds = time.perf_counter() - started
    lr = optimizer.param_groups[0]["lr"]
    seed_slots = list(seed_params)

    def finish(values: list[float], world: int) -> TrainStats:
        # Sums over samples add up across ranks; gradient statistics, taken on averaged gradients,
        # and leak counts are the same on every rank and so come back `world` times over; a flag
        # counts the ranks that raised it.
        total_loss, total_correct, host_norm_total = values[0], values[1], values[2] / world
        ratios = [v / world for v in values[3:3 + len(names)]]
        seed_norms = [v / world for v in values[3 + len(names):3 + 2 * len(names)]]
        at = 3 + 2 * len(names)
        finite_flags = {s: v == world for s, v in zip(finite, values[at:at + len(finite)])}
        at += len(finite)
        count, non_finite, measured = int(values[at]), values[at + 1] > 0, values[at + 2] / world
        # Rounded up: a leak seen on any rank is a leak.
        seen = {s: math.ceil(v / world) for s, v in zip(leak_slots, values[at + 3:]) if s in leaks}
        seeds = {}
        for s in seed_slots:
            m = names.index(s) if s in names else None
            seeds[s] = SeedGradients(
                grad_ratio=ratios[m] / measured if m is not None and measured else None,
                seed_grad_norm=seed_norms[m] / measured if m is not None and measured else None,
                host_grad_norm=host_norm_total / measured if m is not None and measured else None,
                isolation_leaks=seen.get(s) if s in leak_slots else None,
                finite=finite_flags[s] and not non_finite,
            )
        mean_loss = total_loss / count if count else float("nan")
        return TrainStats(
            loss=mean_loss, score=score(mean_loss, total_correct / count if count else float("nan")),
            samples=count, non_finite=non_finite or not count, seeds=seeds, lr=lr, seconds=seconds,
        )

    return Pending(packed, finish)


def _finite_gradients(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
