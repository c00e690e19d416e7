"""Engine overhead: the same host + seed training, once through Esper and once as a bare loop.

Both sides train the `cifar10` host (CNN-8, batch 128, augmentation on) on random 32x32 uint8
images held in memory, for the same epochs, from the same run seed, with the same seed work:
a fixed controller germinates `conv_light` in `mid` after epoch GERMINATE_AT; the lifecycle then
advances it by its own ticks (G2 relaxed so it passes after one TRAINING epoch on random data), so
training includes the incubation pass and validation the shadow, then the blend with its ablation
counterfactual.

Esper side: `Run` driven through `execute`, i.e. every epoch is `Engine.step`: training, fused
validation, governor check and snapshots, `RecordEpoch` / reward / decision / `Tick` through the
decider into the event log, the live projections, and one fsync per epoch (`fsync="epoch"`).
Run checkpoints are off (`checkpoint_every=0`); their cost is measured separately at the end.

Bare side: a plain loop over the same model, optimizer and data. It builds the host, the
`GrowingModel` and the optimizer with esper's constructors, attaches the seed and its parameter
group at the same epoch, puts each slot in the mode and alpha the Esper run had in that epoch (taken
from a warm-up Esper run), and calls esper's `train_pass` (the same gradient statistics and
incubation pass) and `evaluate` (the same fused counterfactual configurations) on esper's batches.
It has no events, decider, projections, controller, governor, reward, log or fsync. The two sides
must agree on every epoch's train and validation loss (checked), so they did the same work.

Esper and bare runs alternate in one process (pair k runs Esper first when k is even, bare first
when odd). Reported: per-epoch times, the per-pair ratio of summed epoch times and their median
(the RESULT), the same ratio in process CPU time, and the ratio of per-epoch best-of-pairs times
(robust to other processes on a shared machine, which only ever add time), and the engine's own
time per epoch: `Engine.step` less the backend's training and validation passes, which is what the
ratio's excess should be once the noise of a shared machine is taken out. Whole-run times (Esper
adds RunStarted and the log; both run the final test) are shown too.

Run: `.venv/bin/python benchmarks/engine_overhead.py [--pairs 3] [--epochs 5] [--train 4096]`.
Last line: `RESULT overhead_ratio=<median esper/bare>`. Target: <= 1.03.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from random_cifar import random_cifar

from esper.compute import optimizer as opt
from esper.compute.blueprints import get_blueprint
from esper.compute.checkpoints import prune, write_checkpoint
from esper.compute.hosts import CNN_PRESETS, CNNHost
from esper.compute.slot import GrowingModel
from esper.compute.streams import DATA, HOST_INIT, episode_seed, generator
from esper.compute.sums import settle
from esper.compute.training import train_pass
from esper.compute.validation import Configuration, evaluate
from esper.events.catalogue import PolicyCommand, PolicyDecided
from esper.lifecycle.decide import state_digest
from esper.policy.actions import GERMINATE, head_values, legal_summary, valid_actions
from esper.policy.run_config import RunConfig, resolve
from esper.policy.runner import CHECKPOINT_FORMAT, Run, execute
from esper.tasks import TaskData, eval_batches, train_batches

GERMINATE_AT = 2  # decision at the end of epoch 2: TRAINING in epoch 3, BLENDING from epoch 4
SLOT, BLUEPRINT = "mid", "conv_light"
RUN_SEED = 0


# -- data and configuration -------------------------------------------------------------------


def make_config(epochs: int, threads: int) -> RunConfig:
    return resolve({
        "run": {"task": "cifar10", "epochs": epochs, "seed": RUN_SEED, "device": "cpu", "threads": threads,
                "policy": "none", "checkpoint_every": 0, "fsync": "epoch"},
        # Random labels: no real shadow gain, so G2 is relaxed to pass after one TRAINING epoch.
        "lifecycle": {"g2_min_training_epochs": 1, "g2_min_shadow_gain": -100.0, "g2_min_gradient_ratio": 0.0},
    })


class FixedController:
    """Germinates BLUEPRINT in SLOT at the decision of epoch GERMINATE_AT; waits otherwise."""

    name = "fixed"
    policy_id = "bench-fixed-v1"

    def reset(self, env: int, episode: int, max_epochs: int) -> None:
        pass

    def decide(self, observation) -> PolicyDecided:
        table = valid_actions(observation)
        command = None
        if observation.epoch == GERMINATE_AT and SLOT in table.slots.get(GERMINATE, ()):
            command = PolicyCommand(op=GERMINATE, slot=SLOT, blueprint=BLUEPRINT, reason="benchmark schedule")
        action, index = head_values(table, command)
        return PolicyDecided(
            epoch=observation.epoch, policy=self.name, policy_id=self.policy_id,
            commands=() if command is None else (command,), action=action, action_index=index,
            legal=legal_summary(table), rationale="fixed benchmark schedule",
        )

    def state_dict(self) -> dict:
        return {"kind": self.name}

    def load_state_dict(self, state: dict) -> None:
        pass


# -- the Esper side ---------------------------------------------------------------------------


def esper_run(config: RunConfig, data: TaskData, root: Path, name: str,
              record_schedule: bool = False) -> dict[str, Any]:
    run_dir = root / name
    run_dir.mkdir()
    losses: list[tuple[float, float]] = []

    def on_epoch(engine, metrics) -> None:
        losses.append((metrics.train_loss, metrics.val_loss))

    started = time.perf_counter()
    run = Run(config, run_dir, data, on_epoch)
    run.engine.controller = FixedController()
    schedule: list[dict[str, Any]] = []
    if record_schedule:
        _record_schedule(run, schedule)
    epoch_times: list[float] = []
    cpu_times: list[float] = []
    own_times: list[float] = []  # the step less the backend's training and validation passes
    inside = [0.0]
    step = run.engine.step

    def timed(method):
        def call(*args):
            t0 = time.perf_counter()
            try:
                return method(*args)
            finally:
                inside[0] += time.perf_counter() - t0
        return call

    run.backend.run_epoch = timed(run.backend.run_epoch)

    def timed_step(env: int, epoch: int) -> bool:
        inside[0] = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        finished = step(env, epoch)
        epoch_times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        own_times.append(epoch_times[-1] - inside[0])
        return finished

    run.engine.step = timed_step  # Run.train calls engine.step once per epoch
    outcome = execute(run)
    assert outcome.status == "completed", outcome.status
    return {"epochs": epoch_times, "cpu": cpu_times, "own": own_times, "total": time.perf_counter() - started,
            "losses": losses, "schedule": schedule, "run": run}


def _record_schedule(run: Run, schedule: list[dict[str, Any]]) -> None:
    """What the engine asks of its backend each epoch: seeds built, slot modes, measurements."""
    backend = run.backend
    original = {n: getattr(backend, n) for n in ("germinate", "run_epoch")}
    epoch_of = {"current": 0}

    def germinate(slot, blueprint, blend_kind, init_seed):
        schedule.append({"op": "germinate", "after_epoch": epoch_of["current"], "slot": slot,
                         "blueprint": blueprint, "blend": blend_kind, "init_seed": init_seed})
        return original["germinate"](slot, blueprint, blend_kind, init_seed)

    def run_epoch(plan):
        epoch_of["current"] = plan.epoch
        modes = {s: (slot.mode, float(slot.alpha), slot.isolated) for s, slot in backend.model.slots.items()
                 if slot.seed is not None}
        schedule.append({"op": "epoch", "modes": modes, "plan": plan})
        return original["run_epoch"](plan)

    backend.germinate, backend.run_epoch = germinate, run_epoch


# -- the bare side ----------------------------------------------------------------------------


def bare_run(config: RunConfig, data: TaskData, schedule: list[dict[str, Any]]) -> dict[str, Any]:
    """Plain PyTorch: build, then per epoch set the slots, train_pass, evaluate; finally test."""
    started = time.perf_counter()
    torch.set_num_threads(config.run.threads)
    spec, device, lc = data.spec, torch.device("cpu"), config.lifecycle
    seed = episode_seed(config.run.seed, 0, 0)
    model = GrowingModel(CNNHost(CNN_PRESETS[spec.host_preset], generator(seed, HOST_INIT)), config.run.slots)
    optimizer = opt.build_optimizer(model.host, spec.host_optimizer)

    def score(loss: float, accuracy: float) -> float:
        return float(spec.score(loss=loss, accuracy=accuracy))

    germinations = {s["after_epoch"]: s for s in schedule if s["op"] == "germinate"}
    epoch_times, cpu_times, losses = [], [], []
    for step in (s for s in schedule if s["op"] == "epoch"):
        plan = step["plan"]
        epoch = plan.epoch
        t0, c0 = time.perf_counter(), time.process_time()
        for slot, (mode, alpha, isolated) in step["modes"].items():
            model.slots[slot].set_slot(mode, alpha, isolated)
        training = train_pass(
            model, optimizer, train_batches(data, generator(seed, DATA, epoch), device), device=device,
            amp="off", scaler=None, ratio_slots=plan.ratio_slots, incubating=plan.incubating,
            leak_slots=plan.leak_slots, stride=lc.grad_stats_stride, eps=lc.gradient_ratio_eps, grad_clip=0.0,
            before_step=lambda: None, score=score,
        )
        configs = [Configuration("main", ())]
        configs += [Configuration(f"ablate:{s}", ((s, 0.0),)) for s in plan.ablate]
        configs += [Configuration(f"shadow:{s}", ((s, 1.0),)) for s in plan.shadow]
        if plan.all_off:
            active = tuple(s for s, slot in model.slots.items() if slot.mode != "inert")
            configs.append(Configuration("all_off", tuple((s, 0.0) for s in active)))
        validation = evaluate(model, eval_batches(data, "val", device), configs, device=device, amp="off",
                              fused=True, score=score)
        stats, (results, _, _) = settle([training, validation], None)
        if epoch in germinations:
            g = germinations[epoch]
            init = generator(g["init_seed"])
            module = get_blueprint(spec.topology, g["blueprint"]).build(model.slots[g["slot"]].channels, init)
            model.slots[g["slot"]].attach(module, g["blend"], init)
            opt.add_seed_group(optimizer, g["slot"], model.slots[g["slot"]].seed_parameters(),
                               spec.seed_optimizer, 1.0)
        epoch_times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append((stats.loss, results["main"].loss))
    settle([evaluate(model, eval_batches(data, "test", device), [Configuration("main", ())], device=device,
                     amp="off", fused=False, score=score)], None)
    return {"epochs": epoch_times, "cpu": cpu_times, "total": time.perf_counter() - started, "losses": losses}


# -- checkpoints ------------------------------------------------------------------------------


def checkpoint_cost(run: Run, repeats: int) -> tuple[float, int]:
    """Median seconds to gather a run's checkpoint state (as Run._checkpoint does) and write it."""
    engine, times, size = run.engine, [], 0
    for k in range(repeats):
        t0 = time.perf_counter()
        state = {
            "format": CHECKPOINT_FORMAT, "epoch": k, "covers_seq": run.writer.next_seq - 1,
            "digest": state_digest(engine.state.envs[0]), "backend": run.backend.state_dict(),
            "governor": engine.governor.state_dict(), "controller": engine.controller.state_dict(),
            "snapshot": engine.snapshot,
        }
        _, _, size = write_checkpoint(run.run_dir, 10_000 + k, state)
        prune(run.run_dir, run.config.run.keep_checkpoints)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), size


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train", type=int, default=4096, help="training images")
    parser.add_argument("--val", type=int, default=1024, help="validation images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where run directories go (default: a temp dir)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    data = random_cifar(args.train, args.val, 256)
    config = make_config(args.epochs, args.threads)
    root = Path(tempfile.mkdtemp(prefix="esper-overhead-", dir=args.dir))
    print(f"cifar10 host on random data: {args.train} train / {args.val} val images, {args.epochs} epochs, "
          f"{args.threads} threads, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; runs in {root}")
    try:
        warm = esper_run(config, data, root, "warmup", record_schedule=True)
        schedule = warm["schedule"]
        epochs = [t for t in schedule if t["op"] == "epoch"]
        stages = [f"e{t['plan'].epoch}:" + (",".join(f"{s}={m[0]}@{m[1]:.2f}" for s, m in t["modes"].items())
                                             or "host") for t in epochs]
        print("schedule (slot modes per epoch): " + " ".join(stages))
        assert any(t["plan"].incubating for t in epochs), "no incubation epoch"
        assert any(t["plan"].ablate for t in epochs), "no ablation epoch"
        bare_warm = bare_run(config, data, schedule)
        for e, (a, b) in enumerate(zip(warm["losses"], bare_warm["losses"]), 1):
            if a != b:
                raise SystemExit(f"bare and esper disagree at epoch {e}: esper {a}, bare {b}")
        print("bare and esper agree on every epoch's train and val loss")

        ratios, cpu_ratios, epoch_ratios, last = [], [], [], None
        runs: dict[str, list[list[float]]] = {"esper": [], "bare": []}
        own: list[float] = []
        for k in range(args.pairs):
            order = ("esper", "bare") if k % 2 == 0 else ("bare", "esper")
            results = {}
            for side in order:
                if side == "esper":
                    results[side] = last = esper_run(config, data, root, f"pair{k}")
                else:
                    results[side] = bare_run(config, data, schedule)
            e, b = results["esper"], results["bare"]
            runs["esper"].append(e["epochs"])
            own += e["own"]
            runs["bare"].append(b["epochs"])
            ratio = sum(e["epochs"]) / sum(b["epochs"])
            ratios.append(ratio)
            cpu_ratios.append(sum(e["cpu"]) / sum(b["cpu"]))
            epoch_ratios += [x / y for x, y in zip(e["epochs"], b["epochs"])]
            print(f"pair {k} ({order[0]} first), load {os.getloadavg()[0]:.2f}")
            print("  esper epochs s: " + " ".join(f"{t:.3f}" for t in e["epochs"])
                  + f"  sum {sum(e['epochs']):.3f}  whole run {e['total']:.3f}")
            print("  bare  epochs s: " + " ".join(f"{t:.3f}" for t in b["epochs"])
                  + f"  sum {sum(b['epochs']):.3f}  whole run {b['total']:.3f}")
            print(f"  ratio {ratio:.4f} (whole run {e['total'] / b['total']:.4f}; process CPU time "
                  f"{cpu_ratios[-1]:.4f}: esper {sum(e['cpu']):.3f} s, bare {sum(b['cpu']):.3f} s)")
        cost, size = checkpoint_cost(last["run"], repeats=10)
        print(f"median per-epoch ratio {statistics.median(epoch_ratios):.4f}; "
              f"per-pair ratios {' '.join(f'{r:.4f}' for r in ratios)}; "
              f"median process-CPU-time ratio {statistics.median(cpu_ratios):.4f}; load {os.getloadavg()[0]:.2f}")
        # Contention from other processes only ever adds time: the per-epoch minimum over runs is the
        # least disturbed estimate of each side's cost.
        best = {side: [min(times) for times in zip(*runs[side])] for side in runs}
        extra_ms = 1000 * (sum(best["esper"]) - sum(best["bare"])) / args.epochs
        print(f"best-of-{args.pairs} epochs s: esper " + " ".join(f"{t:.3f}" for t in best["esper"])
              + "; bare " + " ".join(f"{t:.3f}" for t in best["bare"])
              + f"; ratio {sum(best['esper']) / sum(best['bare']):.4f}, {extra_ms:+.1f} ms per epoch")
        own_ms, epoch_s = 1000 * statistics.median(own), statistics.median(t for r in runs["esper"] for t in r)
        print(f"engine's own time per epoch (step less the backend's train and validate passes: decider, log, "
              f"fsync, projections, controller, governor, reward, germination): median {own_ms:.1f} ms, max "
              f"{1000 * max(own):.1f} ms; {100 * own_ms / 1000 / epoch_s:.2f} % of a median epoch ({epoch_s:.3f} s)")
        median_epoch = statistics.median(best["esper"])
        print(f"checkpoint (state gathered, written, fsynced, renamed, pruned): {cost * 1000:.1f} ms per epoch "
              f"({size / 1024:.0f} KiB), {100 * cost / median_epoch:.2f} % of a median best-of-pairs Esper "
              f"epoch ({median_epoch:.3f} s) with checkpoint_every=1")
        print(f"RESULT overhead_ratio={statistics.median(ratios):.4f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
