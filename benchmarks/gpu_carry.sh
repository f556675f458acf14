#!/usr/bin/env bash
# Fill .gpu-carry/ (ignored by git) with what benchmarks/gpu_check.sh needs on a GPU machine that has
# torch but reaches no package index: wheels of the packages its image lacks, at the versions
# installed here, and CellBench 5cl. Run it here, where pip can download, then carry .gpu-carry
# along with the run (about 30 MB); gpu_check.sh installs the wheels with pip --no-index --no-deps.
#
#   bash benchmarks/gpu_carry.sh            download the wheels, copy the data
#   bash benchmarks/gpu_carry.sh --print    print the pip command only
#
# PYRO_PYTHON (default .venv/bin/python) and SCVI_PYTHON (default /work/scvi-venv/bin/python) give
# the versions; GPU_PYTHON_VERSION (default 3.12) is the GPU machine's Python. The package lists are
# what an image with torch, numpy, scipy, pandas, h5py, scikit-learn, numba, jax, lightning and
# xarray (but no scverse packages) lacks.
set -eu -o pipefail
cd "$(dirname "$0")/.."
dest=.gpu-carry
pyro_python=${PYRO_PYTHON:-.venv/bin/python}
scvi_python=${SCVI_PYTHON:-/work/scvi-venv/bin/python}
pyro_side="pyro-ppl pyro-api anndata array-api-compat legacy-api-wrap natsort zarr numcodecs donfig
           google-crc32c scverse-misc"
scvi_side="scvi-tools docrep ml-collections mudata session-info2 sparse scanpy umap-learn pynndescent
           scikit-misc scib-metrics plottable igraph texttable"

installed() { "$1" -m pip show "$2" 2>/dev/null | awk '/^Version:/ {print $2}'; }
pins=()
for name in $pyro_side; do
    version=$(installed "$pyro_python" "$name")
    [ -n "$version" ] || { echo "$name is not installed in $pyro_python"; exit 1; }
    pins+=("$name==$version")
done
if [ -x "$scvi_python" ]; then
    for name in $scvi_side; do
        version=$(installed "$scvi_python" "$name")
        [ -n "$version" ] || { echo "$name is not installed in $scvi_python"; exit 1; }
        pins+=("$name==$version")
    done
else
    echo "no $scvi_python: without scvi-tools' wheels the scvi-tools side will be skipped"
fi
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
           manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
download=("$pyro_python" -m pip download -q --no-deps --only-binary=:all: --implementation cp
          --python-version "${GPU_PYTHON_VERSION:-3.12}" "${platforms[@]}" -d "$dest/wheels")
if [ "${1:-}" = --print ]; then
    echo "${download[*]} ${pins[*]}"
    exit 0
fi
mkdir -p "$dest/wheels"
for pin in "${pins[@]}"; do
    "${download[@]}" "$pin" 2>/dev/null && continue
    # published as source only (docrep): build the wheel here, which must then be pure Python
    "$pyro_python" -m pip wheel -q --no-deps -w "$dest/wheels" "$pin"
    name=${pin%%==*}
    if ! ls "$dest"/wheels/"${name//-/_}"-*-py3-none-any.whl >/dev/null 2>&1; then
        echo "$pin has no wheel for the GPU machine and is not pure Python"
        exit 1
    fi
done
for data in shared/data/cellbench_5cl.h5ad ../shared/data/cellbench_5cl.h5ad; do
    if [ -f "$data" ]; then
        cp "$data" "$dest/"
        break
    fi
done
[ -f "$dest/cellbench_5cl.h5ad" ] || echo "CellBench 5cl not found: gpu_check.sh will time generated data"
du -sh "$dest"
