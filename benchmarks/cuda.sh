#!/usr/bin/env bash
# The CUDA paths in one go, on a machine with a GPU: a training step and an evaluation against
# PEFT on the GPU (step_time.py, eval_speed.py), then short central MoPs runs in bfloat16 from an
# int8 base and from a 2:4 SparseGPT base, each to its test perplexity. Needs torch with CUDA,
# transformers and peft; not Flower or Ray. Everything it prints is also saved under OUT.
#
#   bash benchmarks/cuda.sh [MODEL] [OUT]
#
# MODEL: the base (default the embedded SmolLM2; a checkpoint of random weights times a model's
# shape without its download). Data: Dolly where the project finds it (../shared/data or
# $MOPS_DATA_DIR). CUDA_CHECK_STEPS (default 20) sets the central runs' steps; PYTHON the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-smollm2}
out=${2:-runs/cuda}
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
steps=${CUDA_CHECK_STEPS:-20}
mkdir -p "$out"
exec > >(tee "$out/cuda.log") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch, transformers; assert torch.cuda.is_available(), 'torch sees no GPU'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"

"$python" benchmarks/step_time.py --device cuda --model "$model" --dtypes float32 bfloat16
"$python" benchmarks/eval_speed.py --device cuda --model "$model" --dtypes float32 bfloat16

for compression in int8 sparsegpt:2:4; do
  echo "== central MoPs on the GPU, bfloat16, compression $compression, $steps steps"
  "$python" -m mops_core.cli train --no-progress --model "$model" --device cuda --dtype bfloat16 \
    --compression "$compression" --calibration-samples 16 --steps "$steps" --samples 400 \
    --eval-samples 32 --generation-samples 2 --out "$out/train-${compression//:/-}"
done
echo "== done: $out"
