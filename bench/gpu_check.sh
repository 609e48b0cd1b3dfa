#!/usr/bin/env bash
# The prepared GPU check: versions, `nvidia-smi -L`, then bench/gpu_check.py (CUDA against CPU results on
# the same inputs, faiss GPU when available, CPU/GPU time ratios). Installs nothing. Under 5 minutes on
# one GPU machine; on a machine without CUDA it prints "CUDA not available: nothing to check" and exits 0.
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
exit "$rc"
