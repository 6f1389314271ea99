#!/usr/bin/env bash
# One GPU session's worth of checks, in the order that matters: GPU correctness of the kernels first, then the
# head benchmark, then the end-to-end training steps. Each stage has its own time limit so that a slow stage
# still leaves the earlier results in $OUT (or ./outputs/device when OUT is unset).
#
# On a machine without `datasets`/`trl`/`liger-kernel` (the lent GPU machines), carry them as wheels in .whl/
# (ignored by git; 3.6 MB). This command fetched a set that fits Python 3.12 there:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl trl==1.16.0 datasets==4.8.5 "dill<0.4.1" "multiprocess<0.70.19" liger-kernel jsonargparse \
#       docstring-parser typeshed-client
# The `strategies` stage needs DeepSpeed, whose sdist installs without building its ops; fetch it and the wheels it
# needs the same way:
#   python3 -m pip download --no-deps --no-binary=deepspeed -d .whl deepspeed==0.19.8
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl hjson pydantic pydantic-core annotated-types typing-inspection
# Start the device command with this script (carry: [".whl"]): it installs whatever .whl/ holds into /tmp/site.
#
#   bash benchmarks/device_check.sh            # GPU: every stage (more than one 10-minute device call)
#   STAGES="tests bench_logprobs" bash benchmarks/device_check.sh    # first call, about 7 minutes at most
#   STAGES=bench_train_step bash benchmarks/device_check.sh          # second call, 8 minutes at most
#   STAGES=strategies bash benchmarks/device_check.sh                # FSDP1/FSDP2/DeepSpeed 2-3, 8 minutes at most
#   STAGES="rollout_tests bench_rollout bench_grpo_step" bash benchmarks/device_check.sh   # online, 8 minutes at most
#   SMOKE=1 bash benchmarks/device_check.sh    # CPU rehearsal of the same stages, tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/device}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${SMOKE:-0}" != "1" ] && compgen -G ".whl/*.whl" >/dev/null; then  # the rehearsal uses what is installed
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    if compgen -G ".whl/deepspeed-*.tar.gz" >/dev/null; then  # no CUDA ops are built: the stages use none
        DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
            --target /tmp/site .whl/deepspeed-*.tar.gz
    fi
fi

STAGES="${STAGES:-tests bench_logprobs bench_train_step strategies rollout_tests bench_rollout bench_grpo_step}"
stage() {  # stage NAME SECONDS COMMAND...: run, keep the log in $OUT/NAME.log, report the status, go on
    local name=$1 limit=$2
    shift 2
    case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]}" >>"$OUT/status.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available())"
} | tee "$OUT/environment.txt"

if [ "${SMOKE:-0}" = "1" ]; then
    stage tests 600 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/ops/test_token_loss.py -x
    stage bench_logprobs 300 python3 benchmarks/bench_logprobs.py --smoke --out "$OUT/bench_logprobs.json"
    stage bench_train_step 300 python3 benchmarks/bench_train_step.py --smoke --out "$OUT/bench_train_step.json"
    stage strategies 300 python3 benchmarks/strategy_check.py --smoke --out "$OUT/strategies.json"
    stage rollout_tests 300 python3 -m pytest -q -p no:cacheprovider tests/rollout/test_rollout_gpu.py
    stage bench_rollout 300 python3 benchmarks/bench_rollout.py --smoke --out "$OUT/bench_rollout.json"
    stage bench_grpo_step 300 python3 benchmarks/bench_grpo_step.py --smoke --out "$OUT/bench_grpo_step.json"
else
    # tests/kernels run on the GPU (tests/ops only exercise CPU paths there)
    stage tests 200 python3 -m pytest -q -p no:cacheprovider tests/kernels
    stage bench_logprobs 240 python3 benchmarks/bench_logprobs.py --reps 20 --out "$OUT/bench_logprobs.json"
    stage bench_train_step 480 python3 benchmarks/bench_train_step.py --warmup 2 --steps 6 \
        --out "$OUT/bench_train_step.json"
    # SFT and DPO under FSDP1, FSDP2, DeepSpeed ZeRO-2/3 on one GPU, against the plain run (10 short runs)
    stage strategies 480 python3 benchmarks/strategy_check.py --out "$OUT/strategies.json"
    # the online half: the fast decode path's GPU tests (static cache, compiled step, equality with generate), the
    # rollout throughput (batch 8 and 64 x 256 tokens) and GRPO steps (1 prompt x 8 x 128 tokens) against TRL
    stage rollout_tests 60 python3 -m pytest -q -p no:cacheprovider tests/rollout/test_rollout_gpu.py
    stage bench_rollout 170 python3 benchmarks/bench_rollout.py --reps 2 --out "$OUT/bench_rollout.json"
    stage bench_grpo_step 240 python3 benchmarks/bench_grpo_step.py --warmup 2 --steps 10 --memory-steps 10 \
        --out "$OUT/bench_grpo_step.json"
fi
cat "$OUT/status.txt"
