#!/usr/bin/env bash
# Container entrypoint of the nirvana-triton image.
#
#   build            export the checkpoint into a GPU-profile model repository (TensorRT plans) unless the one
#                    on disk was built from the same checkpoint fingerprint
#   serve            run tritonserver on that repository (it must have been built)
#   build-and-serve  both (the default: a single container that builds its engines at start when needed)
#   anything else    run as a command, e.g. `nirvana export --help` or `bash`
#
# Engines only run on the GPU architecture and TensorRT version that built them, so each (compute capability,
# TensorRT) pair gets its own folder under NIRVANA_MODEL_REPOSITORY: a volume shared by different node pools
# holds one repository per GPU kind, and builders of the same kind take turns through a file lock.
# Inside a folder `nirvana export` re-exports only when repository_manifest.json names another checkpoint
# fingerprint (or profile); otherwise it only rewrites the small config files, in seconds.
set -euo pipefail

: "${NIRVANA_CHECKPOINT:=/models/checkpoint}"          # diffusers folder (read-only mount)
: "${NIRVANA_MODEL_REPOSITORY:=/models/repository}"    # root of the generated repositories (writable)
: "${NIRVANA_CACHE_DIR:=/var/cache/nirvana}"           # latents live in $NIRVANA_CACHE_DIR/cache/latents
: "${NIRVANA_PROFILE:=gpu}"                            # gpu (TensorRT) | cpu (onnxruntime in python models)
: "${NIRVANA_MILVUS_URI:=}"                            # http://host:19530; empty = milvus-lite (one replica only)
: "${NIRVANA_CONFIG:=}"                                # optional EngineConfig JSON/TOML file
: "${NIRVANA_HTTP_PORT:=8000}"
: "${NIRVANA_GRPC_PORT:=8001}"
: "${NIRVANA_METRICS_PORT:=8002}"
: "${NIRVANA_TRITON_ARGS:=}"                           # extra tritonserver flags, space-separated

log() { echo "[nirvana-entrypoint] $*" >&2; }
die() { log "error: $*"; exit 1; }

# Folder of the repository for this machine: cpu, or sm<compute capability>-trt<TensorRT version>.
repository_dir() {
    if [ "$NIRVANA_PROFILE" = "cpu" ]; then
        echo "$NIRVANA_MODEL_REPOSITORY/cpu"
        return
    fi
    command -v nvidia-smi >/dev/null || die "no nvidia-smi: the gpu profile needs a GPU (NVIDIA container runtime)"
    local cc
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
    [ -n "$cc" ] || die "nvidia-smi reports no GPU"
    echo "$NIRVANA_MODEL_REPOSITORY/sm${cc}-trt${NIRVANA_TENSORRT_VERSION:?set at image build}"
}

build() {
    local repo
    repo=$(repository_dir)
    [ -f "$NIRVANA_CHECKPOINT/model_index.json" ] \
        || die "no diffusers checkpoint at $NIRVANA_CHECKPOINT (mount one, or set NIRVANA_CHECKPOINT)"
    mkdir -p "$repo" "$NIRVANA_CACHE_DIR"
    local args=(export --checkpoint "$NIRVANA_CHECKPOINT" --out "$repo" --profile "$NIRVANA_PROFILE"
                --cache-dir "$NIRVANA_CACHE_DIR")
    [ -z "$NIRVANA_MILVUS_URI" ] || args+=(--milvus-uri "$NIRVANA_MILVUS_URI")
    [ -z "$NIRVANA_CONFIG" ] || args+=(--config "$NIRVANA_CONFIG")
    log "model repository $repo (checkpoint $NIRVANA_CHECKPOINT); first build of TensorRT engines takes minutes"
    # One builder per folder at a time: replicas starting together wait here, then find it built.
    flock "$repo/.build.lock" nirvana "${args[@]}"
}

serve() {
    local repo
    repo=$(repository_dir)
    [ -f "$repo/repository_manifest.json" ] || die "$repo holds no built repository: run the 'build' step first"
    # Word splitting of NIRVANA_TRITON_ARGS is intended (a list of flags).
    # shellcheck disable=SC2086
    exec tritonserver \
        --model-repository="$repo" \
        --http-port="$NIRVANA_HTTP_PORT" \
        --grpc-port="$NIRVANA_GRPC_PORT" \
        --metrics-port="$NIRVANA_METRICS_PORT" \
        --allow-metrics=true \
        --exit-on-error=true \
        $NIRVANA_TRITON_ARGS
}

case "${1:-build-and-serve}" in
    build) build ;;
    serve) serve ;;
    build-and-serve) build && serve ;;
    *) exec "$@" ;;
esac
