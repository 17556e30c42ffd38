#!/usr/bin/env bash
# The GPU check: one prepared run on one lent H100/H200 that prints one table.
#
#   bash bench/gpu_check.sh --prepare     # here (CPU, with PyPI): wheels the GPU image lacks -> .whl/
#   bash bench/gpu_check.sh               # there, e.g. through the device tool with carry [".whl"]
#
# What it measures (about 7 minutes): the `gpt2` preset (124M, GPT-2's vocabulary via
# --vocab_size 50257) at block 1024, bf16, torch.compile, micro-batch 8/16/32, with
# bench/train_throughput.py: tokens/s, MFU, peak memory of train_clm.py's real loop beside the
# plain hand-written GPT-2 loop on the same GPU; the SDPA kernel the loop was restricted to; and a
# one-GPU DeepSpeed ZeRO-2 smoke run. The GPU image has torch, transformers and accelerate but not
# datasets or deepspeed: --prepare downloads those (and their missing needs) as wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 deepspeed==0.19.8 hjson==3.1.0
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)

if [ "${1:-}" = "--prepare" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  mkdir -p .whl
  for w in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$w" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w .whl "$w"   # deepspeed ships as a source tarball
  done
  ls -la .whl
  exit 0
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, accelerate, datasets; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', \
datasets.__version__)" | tee -a "$OUT/gpu.txt"

# demo data (the same code as `make demo`; a smaller corpus is plenty for timing)
[ -f data/demo_corpus/.done ] || { python3 -m clm.corpus --output_dir data/demo_corpus \
  --max_bytes 3000000 && touch data/demo_corpus/.done; }
[ -f data/demo_tokenizer/tokenizer.json ] || python3 -m clm.tokenizer \
  --dataset_name data/demo_corpus --vocab_size 8192 --output_dir data/demo_tokenizer

for mb in 8 16 32; do
  timeout 150 python3 bench/train_throughput.py --preset gpt2 --block_size 1024 \
    --batch_size "$mb" --mixed_precision bf16 --torch_compile --vocab_size 50257 \
    --warmup 8 --steps 20 --workers 2 --repeats 1 > "$OUT/tput_mb$mb.json" 2> "$OUT/tput_mb$mb.err" \
    || echo "micro-batch $mb: failed or timed out (see $OUT/tput_mb$mb.err)"
done

timeout 120 python3 train_clm.py --config configs/demo_cpu.yaml --output_dir /tmp/zero2 \
  --overwrite_output_dir --deepspeed ds_configs/zero2.json --mixed_precision bf16 \
  --max_steps 20 --eval_steps 10 --save_steps 10 --num_samples 1 > "$OUT/zero2.log" 2>&1
echo "zero2 exit $?" >> "$OUT/zero2.log"

python3 - "$OUT" <<'EOF'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
print("\n" + (out / "gpu.txt").read_text().strip())
print("\n| micro-batch | ours tok/s | ours MFU | ours peak GiB | SDPA kernel | reference tok/s "
      "| reference MFU | reference peak GiB | ours / reference |")
print("|---|---|---|---|---|---|---|---|---|")
for mb in (8, 16, 32):
    f = out / f"tput_mb{mb}.json"
    try:
        r = json.loads(f.read_text())
    except Exception:
        print(f"| {mb} | failed | | | | | | | |")
        continue
    o, ref = r.get("ours", {}), r.get("reference", {})
    print(f"| {mb} | {o.get('tokens_per_sec')} | {o.get('mfu')} | {o.get('peak_memory_gb')} | "
          f"{o.get('sdpa_backends')} | {ref.get('tokens_per_sec')} | {ref.get('mfu')} | "
          f"{ref.get('peak_memory_gb')} | {r.get('ours_over_reference')} |")
log = (out / "zero2.log").read_text()
code = re.findall(r"zero2 exit (\d+)", log)
final = re.findall(r"final eval loss ([0-9.]+)", log)
print(f"\nZeRO-2, one GPU, bf16, 20 steps with a checkpoint: exit {code[-1] if code else '?'}, "
      f"final eval loss {final[-1] if final else 'none'}")
EOF
