#!/usr/bin/env bash
# Every GPU check of the open issues in one run, for a session lent a GPU (15 minutes of device time
# in all, machine start included). Prepare here, then run there:
#
#   make gpu-wheels                      # here: TRL and the datasets it needs, as py3.12 wheels in .whl/
#   device run, carry [".whl"]:  bash benchmarks/gpu_check.sh      (timeout_s 600)
#
# Each step has its own time limit and writes its log (and JSON) under $OUT (runs/gpu_check when
# run by hand), so a step that fails or runs long costs only itself. Order = what the issues need
# most: the GPU tests (CUDA-graph decode of our DeepSeek-V3 and the dense layout, bf16 grouped GEMM),
# generation vs transformers (inference issue), the GRPO step vs TRL (RL issue), the training step vs
# transformers, eager (model issue), generation on a user's layout and LoRA with bf16 bases vs full
# fine-tuning (own-model issue). BUDGET (default 570 s) caps the whole script: a step gets at most
# what is left of it and is skipped under 20 s, so the device call's 600 s limit is never the one hit.
# At most 8 files come back from $OUT: summary.txt, steps.log (every step's output) and one JSON per step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu runs the same steps here, as a smoke test of this script
BUDGET=${BUDGET:-570}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    python3 -c "import trl; print('trl', trl.__version__)" 2>&1 | tail -1
} > "$OUT/summary.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the log, note the outcome
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    local left=$((BUDGET - SECONDS))
    if ((left < 20)); then
        echo "$name: skipped (BUDGET=$BUDGET s spent)" >> "$OUT/summary.txt"
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name" >> "$OUT/steps.log"
    timeout "$limit" "$@" > "$OUT/$name.tmp" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - t0)) s" >> "$OUT/summary.txt"
    cat "$OUT/$name.tmp" >> "$OUT/steps.log"
    tail -n 30 "$OUT/$name.tmp"
    rm -f "$OUT/$name.tmp"
}

step gpu_tests 120 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_graphs.py tests/test_moe.py tests/test_shared_prompts.py
step generate 180 python3 benchmarks/bench_generate.py --device "$DEVICE" --repeats 3 --out "$OUT/generate.json"
sides=ours
python3 -c "import trl" 2>/dev/null && sides=ours,trl
step grpo 150 python3 benchmarks/bench_grpo_step.py --device "$DEVICE" --sides "$sides" --warm 2 --steps 4 --out "$OUT/grpo.json"
step train 80 python3 benchmarks/bench_train.py --device "$DEVICE" --repeats 3 --out "$OUT/train.json"
step families 60 python3 benchmarks/bench_families.py --device "$DEVICE" --shapes smollm2-135m --layers 8 \
    --repeats 2 --hf-static --out "$OUT/families.json"
step lora 60 python3 benchmarks/bench_lora.py --device "$DEVICE" --shape qwen2.5-0.5b --layers 8 --repeats 1 \
    --out "$OUT/lora.json"
cat "$OUT/summary.txt"
