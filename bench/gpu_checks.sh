#!/usr/bin/env bash
# The checks only a GPU can make, in one go, for a short GPU allocation (about 8 minutes on one H100/H200):
#
#   bash bench/gpu_checks.sh [OUT_DIR]     # OUT_DIR: log.txt, summary.txt, JSON results (default gpu_checks/)
#
# 1. the compiled Triton correlation kernels against the torch reference and float64 math (tests/test_kernels.py
#    with TRITON_INTERPRET=0: the CPU suite only ever runs them in the interpreter);
# 2. their speed against the eager torch path (bench/kernel_bench.py, bf16 and fp32 with a 60 % token mask);
# 3. peak memory and time of the chunked logit loss against whole logits at the paper's shapes
#    (bench/logit_memory.py: V = 50272 OPT, V = 32000 LLaMA; d_S 2048, d_T 4096, 8192 tokens, bf16);
# 4. what each feature term adds to a distillation step at a 7B-like width (bench/step_overhead.py --preset gpu,
#    with the Triton correlation and again with the eager torch one);
#    the kernels' tile sizes and the logit chunk size swept (bench/gpu_tune.py);
# 5. the live teacher against the teacher cache for the quickstart's pair (bench/cache_speed.py --pruned 432; the
#    teacher has SmolLM2-135M's shape with random weights, which changes no step time);
# 6. the product itself on one GPU: launch/distill.py on the tiny recipe (ZeRO-2 student + ZeRO-3 teacher, then
#    ZeRO-3 student + replicated teacher), NCCL and CUDA instead of the CPU suite's gloo.
#
# Each part has its own time limit and a failure does not stop the others; the summary at the end says which
# passed. ONLY="kernel_tests gpu_tune" runs the parts named there alone. Set PY to the Python that has torch
# (default python3). The repository must be importable: either installed (pip install -e .) or
# FLEXKD_INSTALL=1 to install it (no dependencies, no index) into a temporary folder first.
# Where $OUT may hold only a few files (a lent machine's), everything goes to log.txt, summary.txt and the
# JSON and metrics files named below.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_checks}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
declare -a SUMMARY=()

selected() { [[ -z "${ONLY:-}" || " $ONLY " == *" $1 "* ]]; }
LOG="$OUT/log.txt"
: >"$LOG"
: >"$OUT/summary.txt"
part() {  # part NAME SECONDS COMMAND...: run with a time limit, append to $OUT/log.txt, keep the exit status
    local name=$1 limit=$2
    shift 2
    selected "$name" || return 0
    local start=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    SUMMARY+=("$name: rc $rc, $((SECONDS - start)) s")
    echo "=== $name: rc $rc in $((SECONDS - start)) s" | tee -a "$LOG"
    printf '%s\n' "${SUMMARY[@]}" >"$OUT/summary.txt"
}

if [[ "${FLEXKD_INSTALL:-0}" == 1 ]]; then
    site="${TMPDIR:-/tmp}/flexkd_site"
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" . \
        >>"$LOG" 2>&1 || { echo "install failed: $LOG"; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
"$PY" -c "import torch, triton, transformers, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | grep -v WARNING | tee -a "$LOG"

# From tests/: "python -m pytest" puts the working directory first on sys.path, and the repository's own
# flexkd_ds/ (without flexkd_ds.kernels, which is installed from flexkd_kernels/) would shadow the install.
part kernel_tests 150 env -C tests TRITON_INTERPRET=0 "$PY" -m pytest test_kernels.py -q -p no:cacheprovider
part kernel_bench_bf16 45 "$PY" bench/kernel_bench.py
part kernel_bench_fp32_mask 45 "$PY" bench/kernel_bench.py --dtype fp32 --valid-fraction 0.6
part logit_memory_opt 75 "$PY" bench/logit_memory.py --device cuda --dtype bf16 --vocab 50272 --d-student 2048 \
    --d-teacher 4096 --rows 8192 --repeats 5 --json "$OUT/logit_memory_opt.json"
part logit_memory_llama 75 "$PY" bench/logit_memory.py --device cuda --dtype bf16 --vocab 32000 --d-student 2048 \
    --d-teacher 4096 --rows 8192 --repeats 5 --json "$OUT/logit_memory_llama.json"
part gpu_tune 180 "$PY" bench/gpu_tune.py
part step_overhead 120 "$PY" bench/step_overhead.py --preset gpu --steps 10 --warmup 3 --impl triton
part step_overhead_torch 120 "$PY" bench/step_overhead.py --preset gpu --steps 10 --warmup 3 --impl torch

teacher="${TMPDIR:-/tmp}/smollm2-shape"
if selected cache_speed; then
"$PY" - "$teacher" <<'EOF' >>"$LOG" 2>&1
import json, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from flexkd_ds.inputs.models import __file__ as models_py
from pathlib import Path
spec = json.loads((Path(models_py).parent / "model_configs" / "HuggingFaceTB--SmolLM2-135M-Instruct.json").read_text())
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(**{k: v for k, v in spec.items() if not k.startswith("_")})).save_pretrained(sys.argv[1])
EOF
fi
part cache_speed 90 "$PY" bench/cache_speed.py --teacher "$teacher" --pruned 432 --steps 20 --warmup 3 --batch 8 \
    --seq-len 512

runner=("$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port 29655)
runs="${TMPDIR:-/tmp}/gpu_checks_runs"
part distill_tiny_zero2 90 "${runner[@]}" launch/distill.py --config launch/recipes/tiny.yaml \
    output_dir="$runs/tiny_zero2" train.max_steps=20
part distill_tiny_zero3_replicated 90 "${runner[@]}" launch/distill.py --config launch/recipes/tiny.yaml \
    output_dir="$runs/tiny_zero3" train.max_steps=20 deepspeed.student_config=ds_configs/student_zero3.json \
    deepspeed.teacher_config=ds_configs/teacher_replicated.json
for d in tiny_zero2 tiny_zero3; do  # keep the metrics; the checkpoints stay in $runs
    [[ -f "$runs/$d/metrics.jsonl" ]] && cp "$runs/$d/metrics.jsonl" "$OUT/$d.metrics.jsonl"
done
echo "=== summary" | tee -a "$LOG"
cat "$OUT/summary.txt" | tee -a "$LOG"
