#!/usr/bin/env bash
# One unattended run on a CUDA machine (under 10 minutes): a guided UNet step at 512x512 (batch 2) in float16
# and bfloat16, eager and torch.compile'd, sdtorch beside diffusers in the same process, then a whole 512x512
# 20-step generation; prints one table (seconds per run: it/s = 1 / s). Exits 0 with a message without a GPU.
#
#     bash benchmarks/gpu.sh            # PYTHON=... to use another interpreter than .venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: no CUDA GPU is visible to torch here; nothing to measure."
    exit 0
fi
exec "$PYTHON" benchmarks/compare.py --device cuda --dtypes float16 bfloat16 --sizes 512 --repeats 10 \
    --only unet text vae generation --gen-size 512 --gen-steps 20 --gen-repeats 3 --no-readme \
    --workdir "${SDTORCH_COMPARE_WORKDIR:-/tmp/sdtorch-compare}"
