#!/usr/bin/env bash
# The GPU check of the vectorized path, in one go (about 5 minutes on one GPU, at most 8):
#   1. the vectorized == sequential tests, on the CPU and on the GPU (tests/test_vectorized.py runs
#      every device it finds: BatchNorm, dropout masks, uneven clients, memory groups, algorithms);
#   2. one SGD step of K models by each technique (loop, vmap, hand-written grouped CNN);
#   3. python -m benchmarks --device cuda: the reference loop, sequential and vectorized paths for the CNN,
#      ResNet-20 and VGG-16 on the paper's round (10 clients x 5 epochs x 500 samples), "ratio: N.Nx" each.
# Figures go to a file (default gpu-check-<device>-<UTC time>.txt in the current directory).
#
#   benchmarks/gpu_check.sh                    # on a machine with a CUDA GPU and torch built for it
#   benchmarks/gpu_check.sh --device cpu       # dry run on a CPU: same steps, a tiny workload (a few minutes)
#   benchmarks/gpu_check.sh --out figures.txt
#
# Installs nothing: it needs torch (a CUDA build for --device cuda), the project's dependencies and pytest;
# if fedmr itself is not installed, it runs the checkout's src/ directly.
set -uo pipefail

device=cuda
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="${2:-}"; shift 2 ;;
        --device=*) device="${1#--device=}"; shift ;;
        --out) out="${2:-}"; shift 2 ;;
        --out=*) out="${1#--out=}"; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (use --device cuda|cpu, --out FILE)" >&2; exit 2 ;;
    esac
done
case "$device" in cuda|cpu) ;; *) echo "gpu_check: --device must be cuda or cpu, got '$device'" >&2; exit 2 ;; esac

root="$(cd "$(dirname "$0")/.." && pwd)"
out="${out:-$PWD/gpu-check-$device-$(date -u +%Y%m%dT%H%M%SZ).txt}"
cd "$root"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 PYTHONWARNINGS="ignore::UserWarning"
PY="${PYTHON:-python3}"

missing="$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "numpy", "scipy", "tqdm", "safetensors", "tomli_w", "PIL", "pytest"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)"
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing (install the project first: pip install -e '.[test]')" >&2
    exit 2
fi
if ! "$PY" -c "import fedmr" 2>/dev/null; then
    export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$device" = cuda ]; then
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        "$PY" -c "import torch; print(f'gpu_check: --device cuda, but torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA GPU; run benchmarks/gpu_check.sh --device cpu for a dry run')" >&2
        exit 3
    fi
fi

# the whole check stays under 8 minutes: each step has its own limit
if [ "$device" = cuda ]; then
    tests_limit=120; tech=(--device cuda --models cnn,resnet20,vgg16 --reps 10); tech_limit=60
    bench=(--device cuda --reps 2); bench_limit=270
else  # dry run: the same commands on a tiny workload (limits for a busy 2-core machine, where importing
      # torch alone can take 30 s)
    tests_limit=300; tech=(--device cpu --models cnn --k 4 --batch 10 --reps 2 --threads 1); tech_limit=180
    bench=(--device cpu --models cnn,resnet20,vgg16 --reps 1 --clients 2 --samples 4 --epochs 1 --server-models cnn
           --threads 1)
    bench_limit=600
fi

status=0
step() {  # step LIMIT TITLE COMMAND...: runs it, its output to the screen and the figures file
    local limit="$1" title="$2"; shift 2
    echo "== $title: $*" | tee -a "$out"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v "^  .*(warm-up)$" | tee -a "$out"
    local rc=${PIPESTATUS[0]}
    echo "== $title: exit $rc after $((SECONDS - start)) s$([ "$rc" = 124 ] && echo " (stopped at the ${limit} s limit)")" | tee -a "$out"
    [ "$rc" = 0 ] || status=1
}

{
    echo "# fedmr gpu_check --device $device, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    "$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
} | tee "$out"

step "$tests_limit" "tests" "$PY" -m pytest -q -p no:cacheprovider tests/test_vectorized.py -rs
step "$tech_limit" "techniques" "$PY" -m benchmarks.techniques "${tech[@]}"
step "$bench_limit" "benchmark" "$PY" -m benchmarks "${bench[@]}"

echo "figures: $out"
grep -E "^(## |ratio:|vectorized speed-up|reference loop / fastest)" "$out" || true
exit $status
