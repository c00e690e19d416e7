"""CPU epoch time: fp32 against bf16 autocast, and one process against two (`--backend ddp`).

Precision, on `digits` and on the `cifar10` host fed random 32x32 uint8 images: two torch backends
built from the same seed, one fp32 and one bf16, each with a `conv_light` seed blended into `mid`
(alpha 0.5, so training measures its gradient ratio and validation runs its ablation). Their
epochs (training pass plus fused validation) alternate in one process, the order flipping every
pair; reported are median epoch times and the median of the per-pair ratios bf16 / fp32.

Processes, on `digits` with `--policy none`: `esper run` as one process with one thread, one process
with two threads, and `--nproc 2` with one thread per rank (this machine's two cores either way).
Each run's per-epoch `wall_time_s` (the engine's whole step) comes from its log; the first epoch
(warm-up) is dropped and the median kept. Process start-up is not in these numbers.

Run: `.venv/bin/python benchmarks/amp_ddp.py [--pairs 6] [--cifar-train 2048] [--epochs 15]`.
Last line: `RESULT bf16_over_fp32_digits=… bf16_over_fp32_cifar10=… two_procs_over_one_digits=…`.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from random_cifar import random_cifar

from esper.compute.backend import EpochPlan
from esper.compute.settings import TrainSettings
from esper.compute.torch_backend import TorchBackend
from esper.events import catalogue as ev
from esper.events.log_reader import LogReader
from esper.lifecycle.config import LifecycleConfig
from esper.tasks import TaskData, load_task

SLOTS = ("early", "mid", "late")


def grown(data: TaskData, amp: str) -> TorchBackend:
    b = TorchBackend(data, TrainSettings(amp=amp), LifecycleConfig(), SLOTS, torch.device("cpu"))
    b.build(episode_seed=11, max_epochs=100)
    b.germinate("mid", "conv_light", "linear", init_seed=3)
    b.set_slot("mid", "blend", 0.5, True, False)
    return b


def epoch_seconds(b: TorchBackend, epoch: int) -> float:
    started = time.perf_counter()
    b.run_epoch(EpochPlan(epoch, ratio_slots=("mid",), ablate=("mid",)))
    return time.perf_counter() - started


def precision(name: str, data: TaskData, pairs: int) -> float:
    backends = {"fp32": grown(data, "off"), "bf16": grown(data, "bf16")}
    for amp, b in backends.items():
        epoch_seconds(b, 1)  # warm-up: allocator, kernels
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for k in range(pairs):
        order = ("fp32", "bf16") if k % 2 == 0 else ("bf16", "fp32")
        for amp in order:
            times[amp].append(epoch_seconds(backends[amp], k + 2))
    ratios = [b / f for f, b in zip(times["fp32"], times["bf16"])]
    f, b = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    print(f"{name:<8} fp32 {f * 1000:8.1f} ms/epoch   bf16 {b * 1000:8.1f} ms/epoch   "
          f"bf16/fp32 median of {pairs} pairs {statistics.median(ratios):.3f} "
          f"(per pair: {', '.join(f'{r:.2f}' for r in ratios)})")
    return statistics.median(ratios)


def run_epochs(root: Path, name: str, epochs: int, threads: int, extra: list[str]) -> float:
    command = [sys.executable, "-m", "esper", "run", "--quiet", "--task", "digits", "--policy", "none",
               "--epochs", str(epochs), "--out", str(root), "--name", name, "--set", f"run.threads={threads}",
               "--set", "run.checkpoint_every=0", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise SystemExit(f"{name} failed: {result.stderr.strip().splitlines()[-1]}")
    walls = [r.event.wall_time_s for r in LogReader(root / name / "events.elog").records()
             if isinstance(r.event, ev.EpochCompleted)]
    return statistics.median(walls[1:])


def processes(epochs: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one = run_epochs(root, "one-proc-1-thread", epochs, 1, [])
        threads = run_epochs(root, "one-proc-2-threads", epochs, 2, [])
        two = run_epochs(root, "two-procs", epochs, 1, ["--nproc", "2"])
    print(f"digits   1 process x 1 thread {one * 1000:7.1f} ms/epoch   1 process x 2 threads {threads * 1000:7.1f}"
          f" ms/epoch   2 processes x 1 thread {two * 1000:7.1f} ms/epoch")
    print(f"digits   2 processes / 1 process (1 thread each) {two / one:.3f}   "
          f"1 process 2 threads / 1 thread {threads / one:.3f}")
    return one, threads, two


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--cifar-train", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the process comparison gives each rank one thread; so does this
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, CPU")
    digits = precision("digits", load_task("digits"), args.pairs)
    held_out = args.cifar_train // 4
    cifar = precision("cifar10", random_cifar(args.cifar_train, held_out, held_out), max(2, args.pairs // 2))
    one, _, two = processes(args.epochs)
    print(f"RESULT bf16_over_fp32_digits={digits:.3f} bf16_over_fp32_cifar10={cifar:.3f} "
          f"two_procs_over_one_digits={two / one:.3f}")


if __name__ == "__main__":
    main()
