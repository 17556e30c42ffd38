#!/usr/bin/env bash
# The GPU check: one device call on one H100/H200, at most 9 minutes with its set-up, printing one
# table a row at a time; `--cpu` runs the same items at tiny shapes on CPU (tests/test_bench.py).
#
#   bash bench/gpu_check.sh --prepare   # here (CPU, with PyPI): wheels the GPU image lacks -> .whl/
#   bash bench/gpu_check.sh             # there, e.g. through the device tool with carry [".whl"]
#   bash bench/gpu_check.sh --cpu       # anywhere, offline, no GPU: under 3 minutes on 2 cores
#
# Items, in order, on the same GPU in the same call, each a row of $OUT/table.md:
#   setup      wheels from .whl/ (the GPU image has torch, transformers, accelerate, peft, but
#              not datasets or deepspeed), then a small demo corpus, its tokenizer and finetuning
#              records, all in a temporary folder (data/ and outputs/ are not touched)
#   plan       `train_clm.py --dry_run` at the pretrain item's shapes: per-GPU memory
#   pretrain   train_clm.py's loop through bench/train_throughput.py: GPT-2 124M (`gpt2` preset,
#              GPT-2's vocabulary) at block 1024, micro-batch 16, bf16, torch.compile, SDPA:
#              tokens/s, MFU, peak memory beside the plan's, the SDPA kernels the loop used
#   reference  bench/reference_gpt.py's plain loop at the same shapes, compiled: ours/reference
#   zero2      train_clm.py under DeepSpeed ZeRO-2 (ds_configs/zero2.json), one GPU, bf16, `gpt2`
#              preset, 10 steps with an evaluation and a checkpoint
#   sft        finetune/run_sft.py (configs/sft_demo.yaml) for 10 steps from the pretrain item's
#              model (the zero2 item's where that failed)
#   generate   generate.py's main on the same model (bench/generate_speed.py): tokens/s
# Each item runs under `timeout -k 10 CAP`, CAP its own budget cut to what is left of the whole
# (GPU_CHECK_BUDGET_S, 530 s on a GPU): an item that cannot start any more is a "skipped" row.
# Rows are appended to $OUT/table.md and printed as items finish, a failed or timed-out item's
# with its exit code and last error line; $OUT/results.jsonl holds each item's figures and
# $OUT/log.txt the tails of their output. Exit 0 when every item is ok, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 deepspeed==0.19.8 hjson==3.1.0
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)

if [ "${1:-}" = "--prepare" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  mkdir -p .whl
  for w in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$w" 2>/dev/null \
    || "$PY" -m pip wheel -q --no-deps -w .whl "$w"   # deepspeed ships as a source tarball
  done
  ls -la .whl
  exit 0
fi
case "${1:-}" in
  "") MODE=gpu ;;
  --cpu) MODE=cpu ;;
  *) echo "error: unknown option '$1' (use --prepare, --cpu or no option)" >&2; exit 2 ;;
esac

# --- shapes and budgets (seconds) of each mode
if [ "$MODE" = gpu ]; then
  # Expected on an H100/H200 (~440 s in all): setup ~45 (wheels ~15, imports ~10, data ~20),
  # plan ~10, pretrain ~150 (CUDA init 10-20, compiling GPT-2 124M's forward and backward ~60-90,
  # 40 steps ~3, the compiled evaluation and saving ~20), reference ~90 (init + compile + 40
  # steps), zero2 ~60 (DeepSpeed's start ~25, two 1.5 GB saves), sft ~45, generate ~30.
  # The caps leave each item about 1.5x that; the whole is held to 530 s however they add up.
  TOTAL=${GPU_CHECK_BUDGET_S:-530}
  CAP_SETUP=150 CAP_PLAN=60 CAP_PRETRAIN=240 CAP_REFERENCE=150 CAP_ZERO2=150 CAP_SFT=120
  CAP_GENERATE=90
  CORPUS_BYTES=2000000 VOCAB=8192 SFT_RECORDS=1000
  PRESET=gpt2 BLOCK=1024 MB=16 WARMUP=10 STEPS=30 WORKERS=4
  PAD=(--vocab_size 50257)             # GPT-2's vocabulary: the demo tokenizer, padded
  PLAN_TOKENIZER=gpt2                  # --dry_run assumes GPT-2's 50257 for a Hub name
  REF_COMPILE=(--torch_compile)
  Z2=(--model_preset gpt2 --block_size 1024 --per_device_train_batch_size 8) Z2_STEPS=10
  Z2_RUN=(train_clm.py)
  SFT_STEPS=10 GEN_TOKENS=128 GEN_PROMPTS=("The" "In the" "A" "This is" "It" "We" "When" "On")
  SHAPES="gpt2 124M, block 1024, micro-batch 16, bf16, compile, sdpa"
else
  # On 2 quiet CPU cores ~85 s in all with inductor's cache warm, ~2 minutes cold (compiling
  # the C++ kernels of pretrain and reference).
  TOTAL=${GPU_CHECK_BUDGET_S:-280}
  CAP_SETUP=60 CAP_PLAN=40 CAP_PRETRAIN=150 CAP_REFERENCE=90 CAP_ZERO2=90 CAP_SFT=60
  CAP_GENERATE=45
  CORPUS_BYTES=300000 VOCAB=512 SFT_RECORDS=200
  PRESET=tiny BLOCK=64 MB=4 WARMUP=2 STEPS=3 WORKERS=0
  PAD=()
  PLAN_TOKENIZER=tokenizer             # (in the work folder)
  REF_COMPILE=(--torch_compile)
  Z2=(--model_preset tiny --block_size 64 --per_device_train_batch_size 4) Z2_STEPS=4
  # DeepSpeed's CPU accelerator JIT-builds its shared-memory collectives at the first
  # deepspeed.initialize (4 minutes of C++ on 2 busy cores, once per machine, and a build killed
  # by the cap leaves a lock every later build waits on for ever); one process never uses them,
  # and on a GPU (CUDA accelerator) no such op exists, so the CPU item skips the build.
  # (deepspeed.comm's attribute `torch` is torch itself, hence sys.modules)
  Z2_RUN=(-c "import runpy, sys, deepspeed.comm.torch
sys.modules['deepspeed.comm.torch'].build_shm_op = lambda: None
sys.argv[0] = 'train_clm.py'
runpy.run_path(sys.argv[0], run_name='__main__')")
  SFT_STEPS=3 GEN_TOKENS=16 GEN_PROMPTS=("The" "A")
  SHAPES="tiny preset, block 64, micro-batch 4, bf16, compile, sdpa (CPU)"
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu  # the same on a machine that has a GPU
fi
# A loaded machine (the test suite beside other jobs) may give every item more time; the caps
# only stop an item that hangs, they measure nothing: GPU_CHECK_SLACK=4 multiplies them all.
SLACK=${GPU_CHECK_SLACK:-1}
TOTAL=$((TOTAL * SLACK)) CAP_SETUP=$((CAP_SETUP * SLACK)) CAP_PLAN=$((CAP_PLAN * SLACK))
CAP_PRETRAIN=$((CAP_PRETRAIN * SLACK)) CAP_REFERENCE=$((CAP_REFERENCE * SLACK))
CAP_ZERO2=$((CAP_ZERO2 * SLACK)) CAP_SFT=$((CAP_SFT * SLACK)) CAP_GENERATE=$((CAP_GENERATE * SLACK))

if [ "$MODE" = gpu ] && ! nvidia-smi -L >/dev/null 2>&1; then
  echo "error: no NVIDIA GPU here (bash bench/gpu_check.sh --cpu checks every item on CPU)" >&2
  exit 2
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT" && rm -f "$OUT/table.md" "$OUT/results.jsonl" "$OUT/log.txt"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX")
trap '[ -n "${GPU_CHECK_KEEP:-}" ] || rm -rf "$WORK"' EXIT
[ "$PLAN_TOKENIZER" = tokenizer ] && PLAN_TOKENIZER=$WORK/tokenizer
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  WANDB_MODE=disabled HF_DATASETS_CACHE=$WORK/hf_datasets
export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}   # the wheels, once installed
# any C++ op a CPU item builds stays here: a build cut short by its cap would leave a lock in the
# user's cache (~/.cache/torch_extensions) that every later build there waits on
[ "$MODE" = cpu ] && export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions

{
  echo "# GPU check ($MODE), $(date -u '+%Y-%m-%d %H:%M UTC'), commit" \
    "$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  [ "$MODE" = gpu ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "budget: ${TOTAL} s in all; each item under \`timeout -k 10\` at its cap or what is left"
  echo
  echo "| item | shapes | result | s | figures |"
  echo "|---|---|---|---|---|"
} | tee "$OUT/table.md"
DEADLINE=$TOTAL
KILL_GRACE=10  # timeout's -k: the KILL comes this long after the TERM

# row ITEM RC SECONDS CAP LABEL SHAPES [WHY]: the item's row, printed and appended to the table
row() {
  local line
  line=$("$PY" bench/gpu_check_row.py --item "$1" --rc "$2" --seconds "$3" --cap "$4" \
         --work "$WORK" --results "$OUT/results.jsonl" --label "$5" --shapes "$6" \
         --why "${7:-}" 2>>"$OUT/log.txt") ||
    line="| $5 | $6 | exit $2, and bench/gpu_check_row.py failed (see log.txt) | $3 | |"
  echo "$line" | tee -a "$OUT/table.md"
  { echo "=== $1 (exit $2, ${3} s of ${4} s)"
    for f in "$WORK/$1.out" "$WORK/$1.err"; do
      [ -s "$f" ] && { echo "--- ${f##*/} (last 60 lines)"; tail -n 60 "$f"; }
    done; } >> "$OUT/log.txt"
}

# run_item ITEM CAP LABEL SHAPES COMMAND...: COMMAND under `timeout -k`, stdout to WORK/ITEM.out
# and stderr to WORK/ITEM.err, then its row. The cap is cut to what is left of the deadline.
run_item() {
  local item=$1 cap=$2 label=$3 shapes=$4 start rc
  shift 4
  local left=$(( DEADLINE - SECONDS - KILL_GRACE - 5 ))
  if (( left < 15 )); then
    row "$item" skip 0 0 "$label" "$shapes" \
      "out of time (${SECONDS} s of the ${TOTAL} s budget spent)"
    return
  fi
  (( cap > left )) && cap=$left
  echo "... $item: up to ${cap} s (at ${SECONDS} s)" >&2
  start=$SECONDS
  timeout -k "$KILL_GRACE" "$cap" "$@" > "$WORK/$item.out" 2> "$WORK/$item.err"
  rc=$?
  row "$item" "$rc" $(( SECONDS - start )) "$cap" "$label" "$shapes"
}

# --- setup: wheels, versions, data
setup() {
  set -e
  if [ "$MODE" = gpu ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" .whl/*.whl >&2
  fi
  "$PY" - <<'EOF'
import json, importlib.metadata as md, os
import torch, transformers, accelerate, datasets  # noqa: F401 (they import, with the wheels)
v = {}
for name in ("torch", "transformers", "accelerate", "datasets", "deepspeed", "peft"):
    try:
        v[name] = md.version(name)
    except md.PackageNotFoundError:
        v[name] = None
device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
    f"cpu ({os.cpu_count()} cores)"
print(json.dumps({"device": device, **v}))
EOF
  "$PY" -m clm.corpus --output_dir "$WORK/corpus" --max_bytes "$CORPUS_BYTES" >&2
  "$PY" -m clm.tokenizer --dataset_name "$WORK/corpus" --vocab_size "$VOCAB" \
    --output_dir "$WORK/tokenizer" >&2
  "$PY" -c "import sys; from clm.corpus import build_sft_records as b; \
print(b(sys.argv[1], max_records=int(sys.argv[2])))" "$WORK/sft_data/train.jsonl" \
    "$SFT_RECORDS" >&2
}
export -f setup
export MODE PY WORK CORPUS_BYTES VOCAB SFT_RECORDS
run_item setup "$CAP_SETUP" "setup" "corpus ${CORPUS_BYTES} bytes, vocab ${VOCAB}" bash -c setup

# the data and schedule every training item shares (train_throughput and zero2)
cat > "$WORK/bench.yaml" <<EOF
dataset_name: $WORK/corpus
tokenizer_name: $WORK/tokenizer
validation_split_percentage: 5.0
validation_split_tokens: $(( BLOCK * 16 ))
learning_rate: 6.0e-4
min_lr: 6.0e-5
weight_decay: 0.1
per_device_eval_batch_size: 16
seed: 1337
EOF

run_item plan "$CAP_PLAN" "plan (--dry_run)" "$SHAPES, 1 GPU" \
  "$PY" train_clm.py --config configs/gpt2_124m_owt.yaml --dry_run --dry_run_num_gpus 1 \
  --output_dir "$WORK/plan" --tokenizer_name "$PLAN_TOKENIZER" --model_preset "$PRESET" \
  --block_size "$BLOCK" --per_device_train_batch_size "$MB" --gradient_accumulation_steps 1 \
  --mixed_precision bf16 --attn_implementation sdpa --torch_compile true

run_item pretrain "$CAP_PRETRAIN" "pretrain (train_clm.py)" "$SHAPES" \
  "$PY" bench/train_throughput.py --config "$WORK/bench.yaml" --only ours --repeats 1 \
  --preset "$PRESET" --block_size "$BLOCK" --batch_size "$MB" "${PAD[@]}" \
  --mixed_precision bf16 --torch_compile --attn sdpa --warmup "$WARMUP" --steps "$STEPS" \
  --workers "$WORKERS" --keep_output "$WORK/pretrain"

run_item reference "$CAP_REFERENCE" "reference (bench/reference_gpt.py)" \
  "the same shapes, bf16$([ ${#REF_COMPILE[@]} -gt 0 ] && echo ', compile' || echo ', eager')" \
  "$PY" bench/train_throughput.py --config "$WORK/bench.yaml" --only reference --repeats 1 \
  --preset "$PRESET" --block_size "$BLOCK" --batch_size "$MB" "${PAD[@]}" \
  --mixed_precision bf16 "${REF_COMPILE[@]}" --warmup "$WARMUP" --steps "$STEPS"

run_item zero2 "$CAP_ZERO2" "ZeRO-2, one process" "${Z2[*]} bf16, ${Z2_STEPS} steps" \
  "$PY" "${Z2_RUN[@]}" --config "$WORK/bench.yaml" --output_dir "$WORK/zero2" \
  --overwrite_output_dir --deepspeed ds_configs/zero2.json --mixed_precision bf16 "${Z2[@]}" \
  --max_steps "$Z2_STEPS" --eval_steps "$Z2_STEPS" --save_steps "$Z2_STEPS" --logging_steps 1 \
  --warmup_steps 2 --num_samples 1 --sample_max_new_tokens 16 \
  --dataloader_num_workers "$WORKERS"

# the model the last two items start from: the pretrain item's, else the zero2 item's
BASE=
for item in pretrain zero2; do
  if [ -f "$WORK/$item/model.safetensors" ]; then
    BASE=$WORK/$item
    echo "the $item item's model" > "$WORK/sft.base"
    cp "$WORK/sft.base" "$WORK/generate.base"
    break
  fi
done

if [ -n "$BASE" ]; then
  run_item sft "$CAP_SFT" "SFT (finetune/run_sft.py)" \
    "configs/sft_demo.yaml, block 128, micro-batch 8, bf16, ${SFT_STEPS} steps" \
    "$PY" finetune/run_sft.py --config configs/sft_demo.yaml --model_name_or_path "$BASE" \
    --train_files "$WORK/sft_data/train.jsonl" --output_dir "$WORK/sft" --overwrite_output_dir \
    --max_steps "$SFT_STEPS" --eval_steps "$SFT_STEPS" --save_steps "$SFT_STEPS" \
    --logging_steps 1 --warmup_steps 2 --eval_metrics "" --num_samples 1 \
    --sample_max_new_tokens 16 --mixed_precision bf16
  prompts=()
  for p in "${GEN_PROMPTS[@]}"; do prompts+=(--prompt "$p"); done
  run_item generate "$CAP_GENERATE" "generate (generate.py)" \
    "${#GEN_PROMPTS[@]} prompts x ${GEN_TOKENS} new tokens, sampled" \
    "$PY" bench/generate_speed.py --model "$BASE" "${prompts[@]}" \
    --max_new_tokens "$GEN_TOKENS" --seed 0
else
  for item in sft generate; do
    row "$item" skip 0 0 "$item" "" "no trained model (the pretrain and zero2 items failed)"
  done
fi

ok=$(grep -c '"status": "ok"' "$OUT/results.jsonl" 2>/dev/null)
echo | tee -a "$OUT/table.md"
echo "${ok:-0} of 7 items ok in ${SECONDS} s (budget ${TOTAL} s)" | tee -a "$OUT/table.md"
[ "${ok:-0}" = 7 ]
