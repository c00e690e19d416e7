#!/usr/bin/env bash
# The CUDA checks of the distributed/AMP issue as one command for a lent GPU machine (runtime §3.5,
# §5.3), sized to fit one device call (about 6 minutes on an H100).
#
# The machine's image holds torch with CUDA, numpy, attrs, click and scikit-learn, but not msgspec
# or cattrs: they travel as wheels. Once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl msgspec cattrs
# then run `bash benchmarks/device_checks.sh` on the device with `.whl` carried. What it checks:
#   1. `esper run` on CUDA in fp32, bf16 and fp16 (the scaler's scale and the peak memory recorded
#      each epoch), with a policy that germinates, so seeds train, blend and are ablated on the GPU;
#   2. `--compile` on CUDA (graphs compiled per epoch, none after warm-up);
#   3. `--nproc 1`: the ddp backend on nccl, one rank;
#   4. benchmarks/cuda_amp.py: fp32 / bf16 / fp16 x eager / compile, side by side, GPU utilisation.
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD:$PWD/benchmarks" PYTHONUNBUFFERED=1
OUT="${OUT:-$(mktemp -d)}"
RUNS="$OUT/runs"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
common=(--task digits --device cuda --policy random --seed 1 --quiet --out "$RUNS" --set run.threads=4)
for amp in off bf16 fp16; do
  python3 -m esper run "${common[@]}" --epochs 8 --amp "$amp" --name "amp-$amp"
done
python3 -m esper run "${common[@]}" --epochs 6 --amp bf16 --compile --name compiled
python3 -m esper run "${common[@]}" --epochs 6 --nproc 1 --name nccl
python3 - "$RUNS" <<'PY'
import sys
from pathlib import Path

from esper.events import catalogue as ev
from esper.events.log_reader import LogReader

for run in sorted(Path(sys.argv[1]).iterdir()):
    log = [r.event for r in LogReader(run / "events.elog").records()]
    epochs = [e for e in log if isinstance(e, ev.EpochCompleted)]
    seeds = sum(isinstance(e, ev.SeedGerminated) for e in log)
    status = next(e.status for e in log if isinstance(e, ev.RunFinished))
    print(f"{run.name:<10} {status:<9} world {log[0].world_size} device {log[0].device} seeds {seeds} "
          f"val_acc {epochs[-1].val_acc:.2f} ms/epoch {1000 * sorted(e.wall_time_s for e in epochs)[len(epochs) // 2]:.1f} "
          f"peak MiB {max((e.peak_memory_bytes or 0) for e in epochs) / 2**20:.1f} "
          f"amp_scale {[e.amp_scale for e in epochs][-1]} recompiles {[e.recompiles for e in epochs]}")
PY
python3 benchmarks/cuda_amp.py --pairs 5
