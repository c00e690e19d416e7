"""CUDA epoch time of the `cifar10` host: fp32, bf16 and fp16 autocast, each eager and compiled.

The host is fed random 32x32 uint8 images (`random_cifar.py`), with a `conv_light` seed
blended into `mid` at alpha 0.5, so every epoch is a training pass that measures the seed's gradient
ratio plus a validation fused with its ablation, as in a run. Six torch backends start from the same
seeds: fp32 / bf16 / fp16 autocast (fp16 with the GradScaler the backend builds) x eager / compiled
(`train.compile`: torch.compile per module instance through the backend's own `Compiler`).

All are built first, then each runs 2 warm-up epochs (allocator, cuDNN, compile and autotune; their
seconds are reported apart), then every round runs one epoch of each variant, the order rotating,
so drifting clocks and heat fall on all alike. Reported per variant: the median epoch time, its
ratio to fp32-eager (median of the per-round ratios; lower is faster), the epoch's peak memory above
what was allocated when it began (all six backends stay resident, so a plain peak would count the
others), graphs compiled during the timed epochs (0 once warm), the val loss after the last epoch
next to fp32's (labels are random, so about ln 10 = 2.30: a check that AMP trains sanely), and the
mean GPU utilisation sampled every ~100 ms during that variant's epochs (torch.cuda.utilization
through pynvml, else nvidia-smi; NVML averages over its own 1/6 to 1 s window, so this is coarse).
cuDNN runs fp32 convolutions in TF32 by default; the header says whether it does here.

Run on a GPU: `.venv/bin/python benchmarks/cuda_amp.py --pairs 5` (`--variants fp32,bf16` picks some;
`--batch 512` overrides the task's 128; `--deterministic` as `esper run` does by default). A check of
the logic on CPU, where fp16 is skipped: `--device cpu --no-compile --pairs 2 --train 512`.
Last line: `RESULT bf16_over_fp32=… fp16_over_fp32=… compile_over_eager_fp32=… gpu_util_fp32=…`.
"""

import argparse
import os
import statistics
import subprocess
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import attrs
import torch

from amp_ddp import SLOTS
from random_cifar import random_cifar

from esper.compute.backend import EpochPlan, TrainStats, ValStats
from esper.compute.errors import SetupError
from esper.compute.precision import check_precision
from esper.compute.settings import TrainSettings
from esper.compute.torch_backend import TorchBackend
from esper.lifecycle.config import LifecycleConfig
from esper.tasks import TaskData

AMP = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}
VARIANTS = {**{p: (amp, False) for p, amp in AMP.items()}, **{f"{p}+compile": (amp, True) for p, amp in AMP.items()}}
WARMUP_EPOCHS = 2  # the first compiles; the second catches the variants that only the first revealed
SAMPLE_EVERY_S = 0.1


def grown(data: TaskData, device: torch.device, amp: str, compiled: bool) -> TorchBackend:
    b = TorchBackend(data, TrainSettings(amp=amp, compile=compiled), LifecycleConfig(), SLOTS, device)
    b.build(episode_seed=11, max_epochs=100)
    b.germinate("mid", "conv_light", "linear", init_seed=3)
    b.set_slot("mid", "blend", 0.5, True, False)
    return b


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch(b: TorchBackend, index: int) -> tuple[float, TrainStats, ValStats]:
    sync(b.device)
    started = time.perf_counter()
    train, val = b.run_epoch(EpochPlan(index, ratio_slots=("mid",), ablate=("mid",)))
    sync(b.device)
    return time.perf_counter() - started, train, val


def utilisation_reader(device: torch.device) -> tuple[Callable[[], float] | None, str]:
    """The first source that answers, and its name; else None and why each failed."""
    if device.type != "cuda":
        return None, "not a CUDA device"
    uuid = str(torch.cuda.get_device_properties(device).uuid).removeprefix("GPU-")
    smi = ["nvidia-smi", f"--id=GPU-{uuid}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
    sources = {
        "torch.cuda.utilization": lambda: float(torch.cuda.utilization(device)),
        "nvidia-smi": lambda: float(subprocess.run(smi, capture_output=True, text=True, timeout=5, check=True).stdout),
    }
    failures = []
    for name, read in sources.items():
        try:
            read()
        except Exception as error:  # no pynvml, no nvidia-smi, "[N/A]" on a MIG slice: try the next
            failures.append(f"{name}: {str(error).strip() or type(error).__name__}")
            continue
        return read, name
    return None, "; ".join(failures)


class Utilisation:
    """GPU utilisation sampled in a thread while a variant's epochs run, kept per variant."""

    def __init__(self, device: torch.device):
        self.read, self.source = utilisation_reader(device)
        self.samples: dict[str, list[float]] = {}

    @contextmanager
    def during(self, name: str) -> Iterator[None]:
        if self.read is None:
            yield
            return
        stop = threading.Event()
        thread = threading.Thread(target=self._sample, args=(self.samples.setdefault(name, []), stop), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _sample(self, samples: list[float], stop: threading.Event) -> None:
        # One more sample once stopped: an epoch shorter than the interval still gets one.
        while True:
            stopped = stop.wait(SAMPLE_EVERY_S)
            try:
                samples.append(self.read())
            except Exception as error:  # a reader that fails midway makes utilisation n/a, never the run
                self.read, self.source = None, f"{self.source} failed: {error}"
                return
            if stopped:
                return

    def mean(self, name: str) -> float | None:
        samples = self.samples.get(name)
        return statistics.fmean(samples) if self.read is not None and samples else None


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; "
                f"bf16 supported: {torch.cuda.is_bf16_supported()}; fp32 convolutions in TF32: "
                f"{torch.backends.cudnn.allow_tf32}, fp32 matmul precision: {torch.get_float32_matmul_precision()}")
    return (f"CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads), "
            f"torch {torch.__version__}")


def number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--pairs", type=int, default=5, help="timed rounds, one epoch of every variant each")
    parser.add_argument("--train", type=int, default=20000, help="training images; validation gets a fifth")
    parser.add_argument("--batch", type=int, default=0, help="batch size (0: the task's, 128); the lr stays the task's")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list from " + ", ".join(VARIANTS))
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled variants")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms, as `esper run` by default")
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if not (args.no_compile and n.endswith("+compile"))]
    if unknown := [n for n in names if n not in VARIANTS]:
        parser.error(f"unknown variants {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if "fp32" not in names:
        parser.error("--variants must include fp32, the baseline of every ratio")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here (check the logic with --device cpu)")
    device = torch.device(args.device)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses deterministic mode without it
        torch.use_deterministic_algorithms(True)
    print(describe(device))

    data = random_cifar(args.train, args.train // 5, args.train // 5)  # CIFAR-10's 50000 / 10000
    if args.batch:
        data = attrs.evolve(data, spec=attrs.evolve(data.spec, batch_size=args.batch))
    for name in list(names):
        try:
            check_precision(VARIANTS[name][0], device)
        except SetupError as error:
            print(f"skipped {name}: {error}")
            names.remove(name)
    backends = {name: grown(data, device, *VARIANTS[name]) for name in names}
    print(f"{len(data.train)} training and {len(data.val)} validation images, batch {data.spec.batch_size}, "
          f"{WARMUP_EPOCHS} warm-up epochs, then timed rounds of {', '.join(names)}: {args.pairs}")

    warmup = {}
    for name, b in backends.items():
        warmup[name] = sum(epoch(b, index)[0] for index in range(1, WARMUP_EPOCHS + 1))
    utilisation = Utilisation(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    peak = dict.fromkeys(names, 0)
    recompiles: dict[str, int | None] = dict.fromkeys(names)
    val_loss = {}
    for k in range(args.pairs):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            with utilisation.during(name):
                seconds, train, val = epoch(backends[name], WARMUP_EPOCHS + 1 + k)
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device) - resident)
            times[name].append(seconds)
            if train.recompiles is not None:
                recompiles[name] = (recompiles[name] or 0) + train.recompiles + val.recompiles
            val_loss[name] = val.main.loss

    ratios = {name: statistics.median(t / f for t, f in zip(times[name], times["fp32"])) for name in names}
    print(f"\n{'variant':<14} {'ms/epoch':>9} {'vs fp32':>8} {'warm-up s':>10} {'peak MiB':>9} {'recompiles':>11} "
          f"{'val loss':>9} {'GPU util %':>11}")
    for name in names:
        memory = f"{peak[name] / 2**20:.1f}" if device.type == "cuda" else "n/a"
        graphs = "-" if recompiles[name] is None else str(recompiles[name])
        print(f"{name:<14} {statistics.median(times[name]) * 1000:9.1f} {ratios[name]:8.3f} {warmup[name]:10.1f} "
              f"{memory:>9} {graphs:>11} {val_loss[name]:9.4f} {number(utilisation.mean(name), 1):>11}")
    print(f"GPU utilisation {'from' if utilisation.read else 'n/a:'} {utilisation.source}")
    print(f"RESULT bf16_over_fp32={number(ratios.get('bf16'))} fp16_over_fp32={number(ratios.get('fp16'))} "
          f"compile_over_eager_fp32={number(ratios.get('fp32+compile'))} "
          f"gpu_util_fp32={number(utilisation.mean('fp32'), 1)}")


if __name__ == "__main__":
    main()
