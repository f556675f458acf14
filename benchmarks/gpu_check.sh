#!/usr/bin/env bash
# GPU check: the device, the CUDA tests, and training and DE timed side by side with scvi-tools on the
# same GPU, in one table. Sized for 8 minutes of GPU time (GPU_CHECK_BUDGET_S, default 420 s):
#
#   1. device facts: nvidia-smi, torch and CUDA versions                      at most 30 s
#   2. the CUDA tests, `pytest -m cuda` (tests/test_host_syncs.py: no host
#      syncs in the training step; tests/test_model_api.py)                   at most 150 s
#   3. benchmarks/gpu_check.py: per data set (CellBench 5cl, top 2000 genes
#      and all genes) and side, one child under its own timeout: one warm-up
#      epoch, 10 timed epochs, one-vs-rest vanilla DE over cell_line, peak
#      GPU memory                                                             the rest, at most 120 s a child
#   4. one markdown table, printed and written with a JSON file to $OUT (else benchmarks/results/gpu_check)
#
# Run from anywhere:  bash benchmarks/gpu_check.sh
# Dry run of the whole pipeline on the CPU with tiny generated data (seconds):
#                     GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh
#
# What it looks for (nothing is downloaded):
#   PYTHON        Python with torch and this project's dependencies (default: .venv/bin/python, else
#                 python3); the working tree's pyro_scvi is put first on PYTHONPATH
#   .gpu-carry/   filled by benchmarks/gpu_carry.sh where pip can download: wheels/*.whl are installed
#                 (pip --no-index --no-deps) into a temporary folder on PYTHONPATH, and
#                 cellbench_5cl.h5ad is the data (else shared/data/ or ../shared/data/, else generated)
#   SCVI_PYTHON   Python with scvi-tools (default: /work/scvi-venv/bin/python if it exists, else PYTHON
#                 when it imports scvi); without one the scvi-tools side is reported as skipped
set -u -o pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-420}
device=${GPU_CHECK_DEVICE:-cuda}
out=${OUT:-benchmarks/results/gpu_check}
carry=${GPU_CHECK_CARRY:-.gpu-carry}
mkdir -p "$out"
left() { echo $((budget - ($(date +%s) - start))); }
capped() { local l; l=$(left); echo $(($1 < l ? $1 : (l > 1 ? l : 1))); }
section() { printf '\n===== %s (%s s left)\n' "$1" "$(left)"; }

section "Python"
python=""
# for the GPU, the first Python whose torch sees CUDA; else (and for the dry run) the first with torch
checks=("import torch")
[ "$device" = cuda ] && checks=("import sys, torch; sys.exit(not torch.cuda.is_available())" "${checks[@]}")
for check in "${checks[@]}"; do
    for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
        [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c "$check" >/dev/null 2>&1; then
            python=$candidate
            break 2
        fi
    done
done
if [ -z "$python" ]; then
    echo "no Python with torch found (tried \$PYTHON, .venv/bin/python, python3, python)"
    exit 2
fi
echo "using $python"
if ls "$carry"/wheels/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
    echo "installing $(ls "$carry"/wheels/*.whl | wc -l) carried wheels into $site"
    if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "$carry"/wheels/*.whl; then
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "WARNING: installing the carried wheels failed; going on without them"
        rm -rf "$site"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${GPU_CHECK_H5AD:-}" ] && [ -f "$carry/cellbench_5cl.h5ad" ]; then
    export GPU_CHECK_H5AD="$carry/cellbench_5cl.h5ad"
fi

section "1. device"
if [ "$device" = cuda ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 20 nvidia-smi || echo "nvidia-smi failed"
    else
        echo "nvidia-smi: not found"
    fi
fi
timeout "$(capped 30)" "$python" - "$device" <<'EOF'
import platform, sys
import torch
print(f"Python {platform.python_version()}, torch {torch.__version__}, built with CUDA {torch.version.cuda}")
print(f"CUDA available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs, cuDNN {torch.backends.cudnn.version()}")
from importlib.metadata import PackageNotFoundError, version
for name in ("pyro-ppl", "anndata", "scipy", "pandas", "numpy"):
    try:
        print(f"{name} {version(name)}")
    except PackageNotFoundError:
        print(f"{name}: MISSING")
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("CUDA is not available to this torch: nothing to check on the GPU")
EOF
[ $? -eq 0 ] || exit 2
if ! failure=$("$python" -c "import pyro_scvi" 2>&1); then
    echo "$failure" | tail -n 3
    echo "pyro_scvi does not import with $python: carry the missing wheels (benchmarks/gpu_carry.sh)"
    exit 3
fi

section "2. CUDA tests"
tests_log="$out/tests.log"
cuda_tests=$(grep -l "pytest.mark.cuda" tests/test_*.py | tr '\n' ' ')
# shellcheck disable=SC2086  # one word per test file
timeout "$(capped 150)" "$python" -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors \
    $cuda_tests 2>&1 | tee "$tests_log"
tests_rc=$?
echo "exit status $tests_rc"

section "3. training and DE, pyro-scvi vs scvi-tools"
timing=(--device "$device" --out "$out" --tests-log "$tests_log" --tests-rc "$tests_rc")
[ "$device" = cpu ] && timing+=(--tiny)
[ -n "${GPU_CHECK_H5AD:-}" ] && timing+=(--h5ad "$GPU_CHECK_H5AD")
rest=$(($(left) - 5))
if [ "$rest" -lt 30 ]; then
    echo "skipped: $rest s left of the budget"
    exit 1
fi
timeout "$rest" "$python" benchmarks/gpu_check.py "${timing[@]}" --budget-s "$((rest - 5))" \
    --child-timeout-s "${GPU_CHECK_CHILD_TIMEOUT_S:-120}"
timing_rc=$?
section "done in $(($(date +%s) - start)) s: CUDA tests exit $tests_rc, timing exit $timing_rc"
[ "$tests_rc" -eq 0 ] && [ "$timing_rc" -eq 0 ]
