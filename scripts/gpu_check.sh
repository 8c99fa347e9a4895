#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA machine without internet (see README, "Installing for GPUs"):
#   1. the CUDA tests (tests/gpu: varlen kernel, shared prompts and compiled layers vs padded SDPA in bf16;
#      the weight sync's bucketed gather on NCCL; GRPO steps with NCCL, FSDP2 bf16 with and without CPU
#      offload, with LoRA, packing and the hf rollout; checkpoint merge; stage 1 beside the CLIP scorer);
#      (GPU_TEST_ARGS: more pytest arguments, e.g. GPU_TEST_ARGS='-k stage1');
#   2. benchmarks/gpu_update.py: update-phase tokens/s and MFU, padded vs packed (GPU_BENCH_ARGS="--compile"
#      adds torch.compile'd decoder layers; quote variant names inside it:
#      GPU_BENCH_ARGS='--variants "padded, token budget"').
# Packages the machine lacks may come as wheels in .whl/ (on the H200 image of 2026-12-04: transformers 5.19,
# omegaconf, mathruler with pylatexenc, math-verify with latex2sympy2_extended and antlr4-python3-runtime, peft) and
# Ray as .gpu/raysite.tar.xz (../shared/tools/gpu-carry-ray.sh); both are optional where the machine already has them.
# Results go to $OUT (default ./gpu_out): pytest.log, gpu_update.json, gpu_update.log.
set -uo pipefail
for arg in "$@"; do  # the header comment above is the help; any other argument is a mistake
  if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0; fi
  echo "error: $(basename "$0") takes no arguments (its settings are the variables its header names); got $arg" >&2
  exit 2
done
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" /tmp/site
if [ -f .gpu/raysite.tar.xz ]; then
  tar -xJf .gpu/raysite.tar.xz -C /tmp/site
  chmod +x /tmp/site/ray/core/src/ray/gcs/gcs_server /tmp/site/ray/core/src/ray/raylet/raylet
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import torch, transformers, ray
print("torch", torch.__version__, "transformers", transformers.__version__, "ray", ray.__version__,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
from pebr.workers.attention import varlen_kernel
print("packed attention kernel (bf16):", varlen_kernel(torch.device("cuda", 0), torch.bfloat16))
EOF
status=0
date -u +"start %T"
eval "set -- ${GPU_TEST_ARGS:-}"  # e.g. GPU_TEST_ARGS="-k stage1" to rerun some tests
timeout "${PYTEST_TIMEOUT:-300}" python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rfE "$@" 2>&1 | tee "$OUT/pytest.log" \
  || status=1
date -u +"benchmark %T"
eval "set -- ${GPU_BENCH_ARGS:-}"  # shell words, so that quoted variant names stay whole
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/gpu_update.py --json "$OUT/gpu_update.json" "$@" 2>&1 \
  | tee "$OUT/gpu_update.log" | grep -v "Loading weights" || status=1
exit $status
