#!/usr/bin/env bash
# The prepared GPU check for a session that has the device machine (one H200, torch, no registry).
# Here:   maturin build --release -o dist && echo /dist/ >> .git/info/exclude
# There:  run(command="bash benches/device_check.sh", carry=["dist"], timeout_s=540)
# The tests import hypothesis and ml_dtypes: if the machine lacks them, carry their wheels too
# (see the device README: pip download --no-deps ... -d .whl) and install them the same way.
# It installs the abi3 wheel, runs the gpu-marked tests (CUDA byte-identity, memory bound), then
# the benchmark of issue 5: N=6 full-size SD1 fp16, floor with all cores, pinned/pageable H2D,
# the CPU engine at 1/8/16 threads, the CUDA path and naive torch on CUDA. Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site dist/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_torch_path.py 2>&1 | tee "$OUT/gpu-tests.log"
python3 -m astolfomix_rs.cli bench -n 6 --arch sd1 --factor 1 --folder /tmp/bench --threads 1,8,16 \
  --repeat 2 --json > "$OUT/bench.json" 2> "$OUT/bench.log"
tail -n 30 "$OUT/bench.log"
