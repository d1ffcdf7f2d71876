#!/usr/bin/env bash
# Every GPU check of the kernels in one command, sized for a 15-minute device lease (its parts took about
# 3 minutes together on an H200, run separately): the kernel parity tests compiled, a W4A16 tile sweep, the full kernel table, and a --device cuda
# quantization of stories260K evaluated through both backends. Writes logs and JSON under OUT (default
# out/device) and prints a summary.
#
#   bash benchmarks/device_checks.sh [OUT] [SHARED]
#
# SHARED is the folder holding models/stories260K and data/{calib,wikitext-2} (default ../shared; the device
# tool does not carry ../shared, so copy them into an ignored folder of the checkout and pass its path).
set -u
OUT=${1:-out/device}
SHARED=${2:-../shared}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
JOBS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/env.txt"

# The tests' fixtures read ../shared (tests/conftest.py): point it at SHARED when it is elsewhere.
[ -e ../shared ] || ln -s "$(realpath "$SHARED")" ../shared
export LOWBIT_DATA_DIR="$SHARED/data"
if python3 -c "import xdist" 2>/dev/null; then N="-n $JOBS"; else N=""; fi
timeout 150 python3 -m pytest -q $N tests/kernels > "$OUT/tests.log" 2>&1
stamp "kernel tests rc=$?: $(tail -1 "$OUT/tests.log")"

timeout 150 python3 benchmarks/w4a16_sweep.py --jobs "$JOBS" --out "$OUT/w4a16_sweep.json" > "$OUT/sweep.log" 2>&1
stamp "sweep rc=$?"
grep -A2 " M=" "$OUT/sweep.log" | head -60

timeout 300 python3 benchmarks/kernels.py --jobs "$JOBS" --reps 25 --warmup 3 --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
stamp "kernel table rc=$?"
grep "FASTER_THAN" "$OUT/kernels.log"

Q=$(mktemp -d)/q
{ LOWBIT_DATA_DIR="$SHARED/data" timeout 90 python3 -c 'import sys; from lowbit.cli import main; sys.argv = ["quantize", "model", sys.argv[1], "--recipe", "w4a16", "--out", sys.argv[2], "--device", "cuda"]; main()' "$SHARED/models/stories260K" "$Q"
  echo "quantize rc=$?"
  for b in torch triton; do
    LOWBIT_DATA_DIR="$SHARED/data" timeout 90 python3 -c 'import sys; from lowbit.cli import main; sys.argv = ["quantize", "eval", "ppl", sys.argv[1], "--seqlen", "256", "--limit", "8", "--json", "--device", "cuda", "--backend", sys.argv[2]]; main()' "$Q" "$b"
    echo "ppl $b rc=$?"
  done; } > "$OUT/cuda_quantize.log" 2>&1
stamp "cuda quantization: $(grep -E 'rc=|"ppl"' "$OUT/cuda_quantize.log" | tr '\n' ' ')"
