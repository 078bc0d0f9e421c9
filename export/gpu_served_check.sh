#!/usr/bin/env bash
# GPU check of the served path where TensorRT is absent: the real tritonserver (pytriton wheel), the `torch` profile
# (sub-models = the checkpoint's torch modules on CUDA, fp16, answering in GPU memory as TensorRT engines do), an
# SD 1.5-sized random-weight model at 512x512, and `nirvana bench throughput` at 1 and 8 requests in flight.
#
# It prints and writes to $OUT/throughput.json: images/s at 1 and 8 in flight (bypass and half hits), p50/p99
# latency, UNet rows and ms per execution (Triton's own counters), the orchestration overhead per denoising step
# (server time of a request minus its sub-model requests, over the steps it ran), and a cached vs bypass request.
# Goals in the issue: >= 2x images/s at 8 vs 1, <= 0.5 ms overhead per step.
#
# Run from the repository root on a GPU machine with CUDA torch (the lent H100/H200 machines: Python 3.12, CUDA torch,
# no diffusers, no pytriton — carry their wheels in .whl/, see the device tool's README). A few minutes: making
# the 1B-parameter model (~1 min), the repository, then 2 x (1 + 8) levels of 16 requests of 20 steps.
# NOT RUN YET: no GPU machine was lent to the session that wrote it.
set -euo pipefail
OUT=${OUT:-/tmp/nirvana-gpu}
WORK=${WORK:-/tmp/nirvana-gpu-work}
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# The python backend stub finds packages through the first python3 on PATH and its venv (it ignores PYTHONPATH),
# so everything goes into one venv that also sees the machine's CUDA torch.
python3 -m venv --system-site-packages "$WORK/venv"
PY="$WORK/venv/bin/python"
if [ -d .whl ]; then "$PY" -m pip install -q --no-index --no-deps .whl/*.whl; fi
"$PY" -m pip install -q --no-deps -e .
export PATH="$WORK/venv/bin:$PATH" OMP_WAIT_POLICY=PASSIVE
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA torch'; print('torch', torch.__version__)"

[ -f "$WORK/sd15/model_index.json" ] || nirvana make-tiny-model "$WORK/sd15" --architecture sd15
nirvana bench throughput --checkpoint "$WORK/sd15" --profile torch --levels 1,8 --requests 16 --steps 20 \
    --mix bypass --mix mixed --work-dir "$WORK" --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log"
