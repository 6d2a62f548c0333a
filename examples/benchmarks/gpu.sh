#!/usr/bin/env bash
# The CUDA tests and the GPU columns the README lacks, in one go, on a machine with one CUDA GPU.
#
#   bash examples/benchmarks/gpu.sh [OUTDIR]        # from the repository root; logs in OUTDIR (gpu-results/)
#
# Installs esswatch from this checkout (editable, as CI does) without dependencies or network
# (torch, tensorboard, transformers, lightning and pytest must already be there), then runs, each
# under its own time limit so that a slow part cannot eat the others (9.5 minutes at most in all):
#   1. the tests marked `cuda` (they skip on a machine without a GPU);
#   2. `estimators.py` targets (a), (b), (c) on the GPU;
#   3. `scale.py` (gpt2, llama, mamba, 1 layer, L = 1024) with the side-stream hand-over, then
#      gpt2 and llama with the pinned-host one (`--transfer host`), to pick the faster.
# DEVICE=cpu runs the same commands on the CPU (a check of the script itself; the tests skip).
set -uo pipefail
out=${1:-gpu-results}
device=${DEVICE:-cuda}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS COMMAND...: run it under `timeout`, log to OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: exit $rc$([ $rc = 124 ] && echo ' (time limit)')"
}

$py -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 ||
    { cat "$out/install.log"; exit 2; }
$py - "$device" <<'EOF' | tee "$out/machine.txt" || exit 2
import platform, sys, torch
dev = sys.argv[1]
if dev == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device")
print("python", platform.python_version(), "torch", torch.__version__, "device",
      torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu")
EOF

part cuda-tests 120 $py -m pytest -q -m cuda -rs -p no:cacheprovider tests
part estimators 150 $py examples/benchmarks/estimators.py --device "$device" --repeats 3 --cases abc --skip-table
part scale-side-stream 180 $py examples/benchmarks/scale.py --device "$device" --layers 1 --mamba-hidden 64 \
    --transfer device
part scale-pinned-host 120 $py examples/benchmarks/scale.py --device "$device" --layers 1 --models gpt2,llama \
    --transfer host
