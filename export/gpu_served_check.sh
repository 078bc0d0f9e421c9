#!/usr/bin/env bash
# GPU check of the served path where TensorRT is absent: the real tritonserver (pytriton wheel), the `torch` profile
# (sub-models = the checkpoint's torch modules on CUDA, fp16, answering in GPU memory as TensorRT engines do), an
# SD 1.5-sized random-weight model at 512x512, and `nirvana bench throughput` at 1 and 8 requests in flight.
#
# It prints and writes to $OUT/throughput.json: images/s at 1 and 8 in flight (bypass and half hits), p50/p99
# latency, UNet rows and ms per execution (Triton's own counters), the orchestration overhead per denoising step
# (server time of a request minus its sub-model requests, over the steps it ran), and a cached vs bypass request.
# Goals in the issue: >= 2x images/s at 8 vs 1, <= 0.5 ms overhead per step.
# Then served add-ons on the same model (torch profile): a random ControlNet and LoRA adapter made for it, the
# UNet ms per step plain / with the ControlNet / with both, rows per execution, and an adapter set's load time
# ($OUT/addons.json; skip with ADDONS=0).
#
# Run from the repository root on a GPU machine whose python3 has CUDA torch:
#   bash export/gpu_served_check.sh            # set up (idempotent), make the model, run the benchmark
#   PREPARE_ONLY=1 bash export/gpu_served_check.sh   # set up and make the model only
# Packages the machine lacks (pytriton, diffusers, pymilvus, milvus-lite, faiss, numpy<2 for the python backend
# stub of Triton 24.10, ...) are taken from $WHEELS (default .whl/): wheels are installed, *.tar.xz archives of
# package folders are unpacked, into one venv (the stub finds packages through the first python3 on PATH and ignores PYTHONPATH).
# The retrieval embedder is the model's own CLIP encoder (make-tiny-model --embedder clip): the benchmark's hits are
# exact repeats, and no MiniLM model is served.
set -euo pipefail
OUT=${OUT:-/tmp/nirvana-gpu}
WORK=${WORK:-/tmp/nirvana-gpu-work}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

PY="$WORK/venv/bin/python"
if [ ! -x "$PY" ]; then
    python3 -m venv --without-pip "$WORK/venv"
    SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # python3's packages (CUDA torch; python3 may itself be a venv, which --system-site-packages would skip) are
    # linked in, except numpy (the stub of Triton 24.10 needs numpy<2, from
    # $WHEELS) and what is built for numpy 2 only (scipy, scikit-learn; transformers then skips its sklearn import).
    for outer in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))'); do
        [ -d "$outer" ] || continue
        for entry in "$outer"/*; do
            case "${entry##*/}" in
            numpy | numpy-* | numpy.libs | scipy | scipy-* | scipy.libs | sklearn | scikit_learn*) ;;
            *) [ -e "$SITE/${entry##*/}" ] || ln -s "$entry" "$SITE/" ;;
            esac
        done
    done
    # This checkout's packages, as an editable install puts them (no build backend needed here).
    printf '%s\n' "$PWD/python_backend" "$PWD/client" "$PWD/export" >"$SITE/nirvana-src.pth"
fi
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# A package brought in $WHEELS replaces the link to python3's copy (never written through the link).
unlink_outer() { for name in "$@"; do if [ -L "$SITE/$name" ]; then rm "$SITE/$name"; fi; done; }
top_level() { "$PY" -c 'import sys, zipfile; print(*{n.split("/")[0] for n in zipfile.ZipFile(sys.argv[1]).namelist()})' "$1"; }
shopt -s nullglob
for archive in "$WHEELS"/*.tar.xz; do
    unlink_outer $(tar -tJf "$archive" | cut -d/ -f1 | sort -u)
    tar -xJf "$archive" -C "$SITE"
done
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    for wheel in "${wheels[@]}"; do unlink_outer $(top_level "$wheel"); done
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}" 2>&1 |
        grep -v "^WARNING: Target directory" || true
fi
export PATH="$WORK/venv/bin:$PATH" OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
nirvana() { "$PY" -m nirvana_cli.main "$@"; }
"$PY" -c "import torch, numpy; assert torch.cuda.is_available(), 'no CUDA torch'; print('torch', torch.__version__, 'numpy', numpy.__version__)"
echo "python LIBDIR: $("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"

[ -f "$WORK/sd15/model_index.json" ] || nirvana make-tiny-model "$WORK/sd15" --architecture sd15 --embedder clip
[ "${PREPARE_ONLY:-0}" = 1 ] && exit 0
nirvana bench throughput --checkpoint "$WORK/sd15" --profile torch --levels 1,8 --requests 16 --steps 20 \
    --mix bypass --mix mixed --work-dir "$WORK" --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.log"
[ "${ADDONS:-1}" = 1 ] || exit 0
nirvana bench addons --served --profile torch --checkpoint "$WORK/sd15" --steps 20 --repeats 3 --in-flight 4 \
    --work-dir "$WORK" --json "$OUT/addons.json" 2>&1 | tee "$OUT/addons.log"
