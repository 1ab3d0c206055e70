#!/usr/bin/env bash
# The GPU measurements issue 6 still needs, one part per device command (each fits the
# device's 10-minute limit per command; the four take ~25 of a session's 30 device-minutes).
#
#   here, once:  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp --platform manylinux2014_x86_64 -d .whl \
#                  ml_collections==1.1.0 tensorboardX==2.6.4
#   device:      run(command='bash benchmarks/gpu_plan.sh 1', carry=['.whl'], timeout_s=600)
#                then parts 2, 3, 4 straight after (a machine idle for 30 s is given back).
#
# Why the wheels: the device image has jax, flax, optax, orbax, chex, torch and the rest of
# setup.cfg's needs but not ml_collections (the configs) or tensorboardX (the runner's
# writer). Results land in benchmarks/results/*_gpu.md there and are copied to $OUT with
# the whole log, so a part killed at its limit still returns what it printed.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:?usage: gpu_plan.sh 1|2|3|4 [extra flags for its benchmark]}"; shift
case "$part" in
  # mirrormeta vs PyTorch (MAML and MetaMiDA) at K=5, MetaMiDA / MAML, K=1 / K=5.
  1) cmd=(python3 -m benchmarks.table5 --shapes=omniglot --algorithms=maml,metamida --ks=1,5
          --repeats=6 --deadline_s=500) ;;
  # mini_1shot's whole run projected from measured parts of the runner's loop.
  2) cmd=(python3 -m benchmarks.train_time --config=mini_1shot --steps=200) ;;
  # The strategies behind the GPU default (vmap vs loop, lax vs mirrormeta convolutions,
  # NHWC vs NCHW), on mini_1shot's step.
  3) cmd=(python3 -m benchmarks.strategies --shape=mini64 --algorithm=metamida --steps=5
          --strategies=vmap:full,loop:full,vmap:full:checkpoint:lax,vmap:full:checkpoint:lax:NCHW
          --deadline_s=500) ;;
  # Where mini_1shot's step time goes, per kernel kind and source.
  4) cmd=(python3 -m benchmarks.profile --shape=mini64 --algorithms=maml,metamida --rounds=5) ;;
  *) echo "gpu_plan.sh: no part '$part'; the parts are 1 2 3 4" >&2; exit 2 ;;
esac
cmd+=("$@")  # later flags override the plan's (argparse keeps the last)
out="${OUT:-/tmp/gpu_plan_out}"
mkdir -p "$out"
start=$(mktemp)  # results newer than this are this part's
if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# JAX would otherwise take 75% of the GPU at start, leaving table5's PyTorch workers short.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee "$out/gpu.txt"

echo "+ ${cmd[*]}" | tee "$out/part$part.log"
"${cmd[@]}" 2>&1 | tee -a "$out/part$part.log"
rc=${PIPESTATUS[0]}
find benchmarks/results -name '*_gpu.md' -newer "$start" -exec cp {} "$out"/ \;
exit "$rc"
