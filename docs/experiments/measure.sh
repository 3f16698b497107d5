#!/usr/bin/env bash
# Times patch stacks against main on the GPU machine, each tree in its own processes, in turn.
#
# Here:   bash docs/experiments/measure.sh build main PATCH PATCH+OTHER
#         (trees under var_exp/, one per argument: 'main', or patches joined by '+', applied in
#         order to HEAD); then carry [".whl", ".device", "var_exp"] to the device.
# There:  source .device/env.sh && bash var_exp/measure.sh bench [--profile --profile_top=30]
#         (more bench_schedules flags pass through, e.g. --cases=...; MEASURE_TIMEOUT: seconds per
#         tree, 200 by default)
#         source .device/env.sh && bash var_exp/measure.sh test TREE [K]  # the GPU tests, one tree
#         (K: a pytest -k expression narrowing them, e.g. "triton and bfloat16")
set -euo pipefail
cmd=${1:?build | bench | test}; shift
case "$cmd" in
  build)
    rm -rf var_exp && mkdir var_exp && cp "$0" var_exp/measure.sh
    for tree in "$@"; do
      mkdir "var_exp/$tree" && git archive HEAD | tar -x -C "var_exp/$tree"
      if [ "$tree" != main ]; then
        for patch in ${tree//+/ }; do
          (cd "var_exp/$tree" && patch -p1 -s < "../../docs/experiments/$patch.patch")
        done
      fi
    done
    echo "built: $(ls var_exp | grep -v measure.sh | tr '\n' ' ')";;
  bench)
    nvidia-smi --query-gpu=name --format=csv,noheader || true
    for tree in $(ls "$(dirname "$0")" | grep -v measure.sh); do
      echo "=== $tree"
      (cd "$(dirname "$0")/$tree" && timeout "${MEASURE_TIMEOUT:-200}" python -m launch.bench_schedules \
        --back_to_back=10 --schedules=both:triton_kernel_bwd,clean --modes=fwdbwd "$@" 2>&1 \
        | grep -E '^\| [0-9]|^\| `|^GPU per call' || true)
    done;;
  test)
    cd "$(dirname "$0")/${1:?tree}"
    python -m pytest -q -m gpu -p no:cacheprovider tests/objective/gpu_flare_step_test.py \
      tests/pallas_kernels/two_stream_kernel_test.py -k "(flare or (backward and triton))${2:+ and ($2)}";;
  *) echo "unknown command $cmd: build | bench | test" >&2; exit 2;;
esac
