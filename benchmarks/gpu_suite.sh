#!/usr/bin/env bash
# The GPU suite, for a lent device machine (no network there). Run from the repository root.
#
#   here (with package registries):  pip download --no-deps -d .whl diffusers==0.42.1 transformers==5.23.0
#   there:                            OUT=$OUT bash benchmarks/gpu_suite.sh     (carry .whl)
#
# Installs the carried wheels and this package into /tmp/site (the machine's own torch and
# Triton stay), then runs, each under its own time limit (about 13 minutes in all, inside a
# 15-minute device budget; the most wanted figures first), with logs in $OUT:
#   1. the CUDA tests: Triton kernels (dense and block-sparse) against fp64 references, SoftPAG
#      under CUDA graphs;
#   2. the block-sparse benchmark (issue 25): attention up to S ~ 75k against SDPA and our dense
#      kernel, and a 4-block random-weight Wan stack at drop 0.8;
#   3. the Triton kernel benchmark (--quick);
#   4. the SoftPAG cost rows of issue 5 (SD3-medium width, fp16 then bf16, eager and compiled).
# Written without a GPU to try it on: check the first log if a step fails.
set -u
OUT=${OUT:-runs/gpu}
REPO=$(pwd)
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation \
    --target /tmp/site .whl/*.whl "$REPO" > "$OUT/install.log" 2>&1
python3 -m pip uninstall -y peft >> "$OUT/install.log" 2>&1  # a preinstalled peft may not match diffusers
export PYTHONPATH=/tmp/site
cd /tmp  # the repository's top-level kernels/ would shadow Hugging Face's `kernels` package
nvidia-smi > "$OUT/device.txt" 2>&1
python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__)" \
    >> "$OUT/device.txt" 2>&1

timeout 200 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/test_kernels.py" \
    "$REPO/tests/test_compile.py" "$REPO/tests/test_sparse_attention.py" > "$OUT/tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/summary.txt"

timeout 240 python3 "$REPO/benchmarks/sparse.py" --device cuda --wan-blocks 4 > "$OUT/sparse.log" 2>&1
echo "sparse rc=$?" >> "$OUT/summary.txt"

timeout 100 python3 "$REPO/benchmarks/kernel_speed.py" --quick > "$OUT/kernels.log" 2>&1
echo "kernels rc=$?" >> "$OUT/summary.txt"

SD3M="--device cuda --layers 12 --heads 24 --head-dim 64 --tokens 4096 --reps 21"
for dtype in float16 bfloat16; do
    for mode in "" "--compile"; do
        name="softpag-${dtype}${mode:+-compiled}"
        timeout 60 python3 "$REPO/benchmarks/softpag.py" $SD3M --dtype $dtype $mode > "$OUT/$name.log" 2>&1
        echo "$name rc=$?" >> "$OUT/summary.txt"
    done
done
