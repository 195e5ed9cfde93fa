#!/usr/bin/env bash
# The GPU checks in one go, for a GPU machine with no package index: the library on CUDA with the tiny model
# (one process, then torchrun with NCCL under FSDP and DDP), then bench/gpu_step.py at the real sizes.
#
#   bash bench/gpu_check.sh [OUTDIR]
#
# Each stage has its own time limit and writes its own log into OUTDIR (default ./gpu-check), so a stage that fails
# or runs long still leaves the others' numbers. Python packages the machine lacks may travel as wheels in .whl/
# (installed into /tmp/site first). Measured on one H200: the tiny stage takes about 2 minutes, each real-size
# architecture 3.5-4.5 minutes (a build, then full fine-tune and LoRA rows); STAGES="tiny qwen35" runs a subset.
set -u
OUT_DIR="${1:-gpu-check}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
if [ -z "${SKIP_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'device', torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT_DIR/env.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to OUT_DIR/NAME.log, say how it ended
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "stage $name: exit $rc after $((SECONDS - started)) s" | tee -a "$OUT_DIR/stages.txt"
  tail -n 25 "$OUT_DIR/$name.log"
}

tiny_cuda() {  # the tiny model trained on CUDA: one process in bf16, then one-rank torchrun under FSDP and DDP
  set -e
  local work
  work=$(mktemp -d)
  $PY -m vopd.cli tiny build --output "$work/model"
  $PY -m vopd.cli synth --output "$work/data" --n 16 --seed 0
  local common=(--model "$work/model" --dataset "$work/data/data.jsonl" --steps 3 --batch-size 2 --lr 1e-4
    --runtime.device "${DEVICE:-cuda}" --runtime.dtype bfloat16 --rollout.num_rollouts 2 --rollout.max_new_tokens 16 --collapse_guard.enabled false)
  $PY -m vopd.cli train "${common[@]}" --output "$work/single"
  $PY -m vopd.cli train "${common[@]}" --output "$work/fsdp" --nproc 1 --runtime.strategy fsdp
  $PY -m vopd.cli train "${common[@]}" --output "$work/ddp" --nproc 1 --runtime.strategy ddp
  for run in single fsdp ddp; do
    test -f "$work/$run/final/config.json"
    echo "$run: $(tail -n 1 "$work/$run/metrics.jsonl")"
  done
}

export PY
export -f tiny_cuda
want() { [[ " ${STAGES:-tiny qwen35 qwen25vl logits} " == *" $1 "* ]]; }
want tiny && stage tiny_cuda 180 bash -c tiny_cuda
[ "${DEVICE:-cuda}" = cuda ] || exit 0  # DEVICE=cpu checks the script's first stage on a machine with no GPU
want qwen35 && stage qwen35_4b 300 $PY bench/gpu_step.py --arch qwen3.5-4b --steps 3 --warmup 1
want qwen25vl && stage qwen25vl_3b 260 $PY bench/gpu_step.py --arch qwen2.5-vl-3b --steps 3 --warmup 1
# the same full fine-tune scored from full logits: what the default loss from hidden states saves on a real vocabulary
want logits && stage qwen25vl_3b_logits 200 $PY bench/gpu_step.py --arch qwen2.5-vl-3b --modes full --loss-from logits \
  --steps 2 --warmup 1
