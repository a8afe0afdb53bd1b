#!/usr/bin/env bash
# The GPU checks of issue 13, in one call on a machine with an NVIDIA GPU (H100/H200), in well under 10 minutes:
#   1. bf16 prefill, decode (batch 1 and 8) and a multitask training step (8 x 2048 tokens, 4 images per row) of the
#      ~1.2B "1B" config with the real 448 px / 256-query geometry, eager vs sdpa vs flash-attention-2 (when the wheel
#      is importable), with model-FLOPs utilisation of the training step (benchmarks/run.py --config 1B);
#   2. vLLM serving of a converted checkpoint of the same config, next to ours (skipped when vLLM is not installed).
# Results: benchmarks/RESULTS.md (section "1B-cuda-bfloat16", GPU named) and $OUT/gpu_check/ when $OUT is set.
# Nothing here is needed by the tests; not yet run on a GPU by this project (no GPU was lent when it was written).
#
#   bash benchmarks/gpu_check.sh            # all checks
#   SKIP_VLLM=1 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="${OUT:-/tmp}/gpu_check"
mkdir -p "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG/gpu.txt"
python -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null \
  || pip install -q flash-attn --no-build-isolation 2>"$LOG/flash_attn_install.txt" \
  || echo "flash-attn not available: the flash_attention_2 variant is skipped (see $LOG/flash_attn_install.txt)"

# 1. Our model: every attention implementation in one run (bf16), training MFU against the GPU's dense bf16 peak.
timeout 420 python benchmarks/run.py --config 1B --device cuda --dtype bfloat16 --quick --no-compile --no-int8 --training 2>&1 | tee "$LOG/run.txt"
cp benchmarks/RESULTS.md "$LOG/RESULTS.md"

# 2. vLLM serving of a converted (official-format) random checkpoint of the same config, token-id prompts (the
#    official tokenizer file is not ours to ship), against our `generate` on the same prompts.
if [ -z "${SKIP_VLLM:-}" ] && python -c "import vllm" 2>/dev/null; then
  timeout 240 python - <<'EOF' 2>&1 | tee "$LOG/vllm.txt"
import json, sys, tempfile, time
import torch
sys.path.insert(0, "benchmarks")
from run import CONFIGS
from modeling_qwen_vl import QwenVLConfig, QwenVLForConditionalGeneration

directory = tempfile.mkdtemp()
model = QwenVLForConditionalGeneration._from_config(QwenVLConfig(**CONFIGS["1B"]), dtype=torch.bfloat16)
model.save_pretrained(directory)  # official names, architectures ["QWenLMHeadModel"]
batch, prompt_len, new_tokens = 32, 512, 128
prompts = torch.randint(10, 30000, (batch, prompt_len))

model = model.cuda().eval()
torch.cuda.synchronize(); start = time.perf_counter()
model.generate(input_ids=prompts.cuda(), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
torch.cuda.synchronize(); ours = batch * new_tokens / (time.perf_counter() - start)
del model; torch.cuda.empty_cache()

from vllm import LLM, SamplingParams
llm = LLM(directory, skip_tokenizer_init=True, dtype="bfloat16", trust_remote_code=True,
          hf_overrides={"architectures": ["QwenVLForConditionalGeneration"]}, gpu_memory_utilization=0.6)
params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, detokenize=False)
requests = [{"prompt_token_ids": row} for row in prompts.tolist()]
llm.generate(requests[:2], params)  # warm-up
start = time.perf_counter()
llm.generate(requests, params)
theirs = batch * new_tokens / (time.perf_counter() - start)
print(json.dumps({"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                  "ours_generate_tokens_per_s": round(ours, 1), "vllm_tokens_per_s": round(theirs, 1)}))
EOF
else
  echo "vLLM not installed (or SKIP_VLLM set): serving comparison skipped" | tee "$LOG/vllm.txt"
fi
echo "logs in $LOG"
