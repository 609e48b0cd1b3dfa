#!/usr/bin/env bash
# The prepared GPU check: versions, `nvidia-smi -L`, then bench/gpu_check.py (CUDA against CPU results on
# the same inputs, faiss GPU when available, CPU/GPU time ratios). Installs nothing. Under 5 minutes on
# one GPU machine; on a machine without CUDA it prints "CUDA not available: nothing to check" and exits 0.
# Then a short torchrun job with 1 rank (NCCL): test-mode ranking on CUDA against the CPU's predictions
# (skipped, with a message, without CUDA).
#   bash bench/gpu_check.sh            (from anywhere; PYTHON=... to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
echo "== versions"
"$PY" -c "import sys, numpy, torch; print('python', sys.version.split()[0], '| numpy', numpy.__version__, '| torch', torch.__version__, '| CUDA build', torch.version.cuda, '| CUDA available', torch.cuda.is_available())" || exit 2
"$PY" -c "import faiss; print('faiss', faiss.__version__, '(GPU build)' if hasattr(faiss, 'StandardGpuResources') else '(CPU build)')" 2>/dev/null || echo "faiss not importable"
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
echo "== checks"
timeout 280 "$PY" bench/gpu_check.py "$@"
rc=$?
if [ "$rc" -eq 124 ]; then echo "gpu_check.py did not finish within 280 s"; fi
echo "== torchrun, 1 rank (NCCL): test-mode ranking against the CPU's predictions"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "CUDA not available: torchrun check skipped"
    exit "$rc"
fi
OUT=$(mktemp -d)
SIZE=(--db 4000 --queries 500 --dim 64 --repeats 1)
timeout 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 bench/bench_distributed.py --worker \
    --cuda --out "$OUT/gpu" "${SIZE[@]}" >"$OUT/log" 2>&1 &&
    timeout 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    bench/bench_distributed.py --worker --out "$OUT/cpu" "${SIZE[@]}" >>"$OUT/log" 2>&1 &&
    "$PY" -c "import sys, numpy as n; a, b = (n.load(sys.argv[i] + '/preds.npy') for i in (1, 2)); \
print('torchrun 1 rank: top-1 agreement CUDA vs CPU', (a[:, 0] == b[:, 0]).mean()); sys.exit(0 if (a[:, 0] == b[:, 0]).mean() > 0.99 else 1)" \
    "$OUT/gpu" "$OUT/cpu"
trc=$?
if [ "$trc" -ne 0 ]; then echo "torchrun check failed (exit $trc):"; tail -20 "$OUT/log"; fi
rm -rf "$OUT"
[ "$rc" -ne 0 ] && exit "$rc"
exit "$trc"
