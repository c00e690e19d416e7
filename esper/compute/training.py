"""One training pass (runtime §3.2) with the lifecycle's gradient statistics (lifecycle §4.3–4.4).

Sums accumulate on the device; the pass ends with one device-to-host synchronisation.
"""

import math
import time
from contextlib import nullcontext
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from esper.compute.backend import SeedGradients, TrainStats
from esper.compute.slot import GrowingModel, count_leaks


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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
) -> TrainStats:
    started = time.perf_counter()
    model.train()
    host_params = model.host_parameters()
    seed_params = {s: model.slots[s].seed_parameters() for s in model.slots if model.slots[s].seed is not None}
    zero = torch.zeros((), device=device)
    loss_sum, correct_sum, count = zero.clone(), zero.clone(), 0
    ratio_sum = {s: zero.clone() for s in ratio_slots}
    seed_norm_sum = {s: zero.clone() for s in ratio_slots}
    host_norm_sum = zero.clone()
    measured = 0
    leaks: dict[str, int] = {}
    non_finite = False
    for index, (x, y) in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        capture: dict[str, torch.Tensor] | None = {} if index == 0 and leak_slots else None
        with autocast(device, amp):
            logits = model(x, capture=capture)
        loss, correct, n = loss_and_correct(logits, y)
        if capture is not None:
            leaks = {s: count_leaks(capture[s], host_params) for s in leak_slots if s in capture}
        mean_loss = loss / n
        if not torch.isfinite(mean_loss):
            non_finite = True  # the batch is skipped; the governor sees the epoch as non-finite
            continue
        (scaler.scale(mean_loss) if scaler else mean_loss).backward()
        for slot in incubating:
            _incubation_gradient(model, slot, seed_params[slot], x, y, device, amp, scaler)
        if scaler:
            scaler.unscale_(optimizer)
        if ratio_slots and index % stride == 0:
            host_norm, n_host = _norm(host_params, device)
            host_norm_sum += host_norm
            for s in ratio_slots:
                seed_norm, n_seed = _norm(seed_params.get(s, []), device)
                seed_norm_sum[s] += seed_norm
                if n_seed and n_host:
                    rms_ratio = (seed_norm / math.sqrt(n_seed)) / (host_norm / math.sqrt(n_host) + eps)
                    ok = (seed_norm >= eps) & (host_norm >= eps)
                    ratio_sum[s] += torch.where(ok, rms_ratio, zero)
            measured += 1
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
        loss_sum += loss.detach()
        correct_sum += correct
        count += n
    finite = {s: torch.stack([torch.isfinite(p).all() for p in ps]).all() if ps else torch.ones((), dtype=torch.bool)
              for s, ps in seed_params.items()}
    # One synchronisation for the whole pass.
    names = list(ratio_slots)
    packed = torch.stack(
        [loss_sum, correct_sum, host_norm_sum]
        + [ratio_sum[s] for s in names]
        + [seed_norm_sum[s] for s in names]
        + [finite[s].float() for s in finite]
    ).tolist()
    total_loss, total_correct, host_norm_total = packed[:3]
    ratios = packed[3:3 + len(names)]
    seed_norms = packed[3 + len(names):3 + 2 * len(names)]
    finite_flags = dict(zip(finite, packed[3 + 2 * len(names):]))
    seeds = {}
    for s in seed_params:
        m = names.index(s) if s in names else None
        seeds[s] = SeedGradients(
            grad_ratio=ratios[m] / measured if m is not None and measured else None,
            seed_grad_norm=seed_norms[m] / measured if m is not None and measured else None,
            host_grad_norm=host_norm_total / measured if m is not None and measured else None,
            isolation_leaks=leaks.get(s) if s in leak_slots else None,
            finite=bool(finite_flags[s]) and not non_finite,
        )
    mean_loss = total_loss / count if count else float("nan")
    return TrainStats(
        loss=mean_loss, score=score(mean_loss, total_correct / count if count else float("nan")),
        samples=count, non_finite=non_finite or not count, seeds=seeds,
        lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - started,
    )
