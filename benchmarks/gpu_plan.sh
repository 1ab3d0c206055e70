#!/usr/bin/env bash
# The GPU measurements issue 6 still needs. A session has 15 device-minutes, the machine's
# start (1-2 min) included, and at most 10 minutes per command, so the parts run in order
# of what they decide, several per command:
#
#   here, once:  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp --platform manylinux2014_x86_64 -d .whl \
#                  ml_collections==1.1.0 tensorboardX==2.6.4
#   device:      run(command='bash benchmarks/gpu_plan.sh 3 1', carry=['.whl'], timeout_s=590)
#                then, with 5 device-minutes left: the same with '2' (the machine is given
#                back after 30 s idle, and a new start costs 1-2 minutes).
#
#   3  strategies on mini_1shot's step (vmap vs loop, lax vs mirrormeta convolutions, NHWC
#      vs NCHW): the GPU default by measurement, and whether any variant brings the step
#      under the 30 ms that 60,000 steps in 30 minutes need (42.3 ms on an H100 so far);
#   1  Table 5 with the PyTorch reference: mirrormeta vs PyTorch (target >= 3x), MetaMiDA /
#      MAML and K=1 / K=5 there, achieved FLOP/s against the device's measured rates;
#   2  mini_1shot's whole run projected from measured parts of the runner's loop (its
#      first part alone took 235 s on an H100);
#   4  where mini_1shot's step time goes, per kernel kind and source.
#
# Each part's --deadline_s makes it time fewer rounds rather than be cut off; its programs
# compile in parallel processes (benchmarks.common.build_all), which is most of a part's
# start (40-100 s per Conv4 step on an H100). Extra flags after the parts go to every part
# (argparse keeps the last of a repeated flag), so pass them with one part.
#
# Why the wheels: the device image has jax, flax, optax, orbax, chex, torch and the rest of
# setup.cfg's needs but not ml_collections (the configs) or tensorboardX (the runner's
# writer). Results land in benchmarks/results/*_gpu.md there and are copied to $OUT with
# each part's whole log, so a part killed at its limit still returns what it printed.
set -uo pipefail
cd "$(dirname "$0")/.."
parts=()
while [[ $# -gt 0 && "$1" != -* ]]; do parts+=("$1"); shift; done
[[ ${#parts[@]} -gt 0 ]] || { echo "usage: gpu_plan.sh PART... [extra flags]; parts 1 2 3 4" >&2; exit 2; }
for part in "${parts[@]}"; do
  [[ "$part" =~ ^[1-4]$ ]] || { echo "gpu_plan.sh: no part '$part'; the parts are 1 2 3 4" >&2; exit 2; }
done
out="${OUT:-/tmp/gpu_plan_out}"
mkdir -p "$out"
if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# JAX would otherwise take 75% of the GPU at start, leaving table5's PyTorch workers and the
# compiling processes short.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee "$out/gpu.txt"

rc=0
for part in "${parts[@]}"; do
  case "$part" in
    1) cmd=(python3 -m benchmarks.table5 --shapes=omniglot --algorithms=maml,metamida --ks=1,5
            --repeats=6 --deadline_s=270) ;;
    2) cmd=(python3 -m benchmarks.train_time --config=mini_1shot --steps=200) ;;
    3) cmd=(python3 -m benchmarks.strategies --shape=mini64 --algorithm=metamida --steps=5
            --strategies=vmap:full,loop:full,vmap:full:checkpoint:lax,vmap:full:checkpoint:lax:NCHW
            --deadline_s=250) ;;
    4) cmd=(python3 -m benchmarks.profile --shape=mini64 --algorithms=maml,metamida --rounds=5) ;;
  esac
  cmd+=("$@")
  start=$(mktemp)  # results newer than this are this part's
  echo "+ ${cmd[*]}" | tee "$out/part$part.log"
  "${cmd[@]}" 2>&1 | tee -a "$out/part$part.log"
  status=${PIPESTATUS[0]}
  [[ $status -eq 0 ]] || rc=$status
  find benchmarks/results -name '*_gpu.md' -newer "$start" -exec cp {} "$out"/ \;
done
exit "$rc"
