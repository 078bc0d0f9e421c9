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
#
# Security (docs/deploy.md "Security"): `serve` always starts Triton with its model-repository, shared-memory,
# logging and trace APIs restricted to callers sending the header nirvana-admin-key=<key> (key from
# NIRVANA_ADMIN_KEY_FILE, else a random one nobody is told, so they stay closed), and forwards only the tenant header
# an authenticating gateway sets (NIRVANA_TENANT_HEADER, the engine config's security.tenant_header) to the models.
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
: "${NIRVANA_ADMIN_KEY_FILE:=}"                        # file holding the restricted APIs' key (a mounted Secret)
: "${NIRVANA_TENANT_HEADER:=x-nirvana-tenant}"         # = security.tenant_header of the engine config

# The restricted APIs: everything but health, metadata, model config, statistics and inference.
RESTRICTED_APIS="model-repository,shared-memory,logging,trace"
ADMIN_HEADER="nirvana-admin-key"

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

# The key of the restricted APIs, on stdout. Never logged: only the file it came from is.
admin_key() {
    local file=$NIRVANA_ADMIN_KEY_FILE key
    if [ -n "$file" ] && [ -e "$file" ]; then
        [ -r "$file" ] || die "NIRVANA_ADMIN_KEY_FILE: cannot read $file"
        key=$(tr -d '[:space:]' < "$file")
        [ -n "$key" ] || die "NIRVANA_ADMIN_KEY_FILE: $file is empty"
        # Triton parses "<apis>:<header>=<key>": a separator inside the key would change what is restricted.
        [[ "$key" =~ ^[A-Za-z0-9._~+/-]+$ ]] \
            || die "NIRVANA_ADMIN_KEY_FILE: $file may hold only letters, digits and . _ ~ + / -"
        printf '%s' "$key"
        return
    fi
    [ -z "$file" ] || log "warning: NIRVANA_ADMIN_KEY_FILE=$file does not exist"
    # No key configured: a random one in a file only this user can read, so the APIs stay closed to clients
    # (an operator with a shell in the container can still read it there).
    file=$(umask 077 && mktemp "${TMPDIR:-/tmp}/nirvana-admin-key.XXXXXX")
    key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    printf '%s\n' "$key" > "$file"
    log "restricted Triton APIs ($RESTRICTED_APIS) need header $ADMIN_HEADER: generated a key into $file"
    printf '%s' "$key"
}

serve() {
    local repo key
    repo=$(repository_dir)
    [ -f "$repo/repository_manifest.json" ] || die "$repo holds no built repository: run the 'build' step first"
    [[ "$NIRVANA_TENANT_HEADER" =~ ^[a-z0-9][a-z0-9-]{0,63}$ ]] \
        || die "NIRVANA_TENANT_HEADER must be a lower-case header name, got '$NIRVANA_TENANT_HEADER'"
    key=$(admin_key)
    # Word splitting of NIRVANA_TRITON_ARGS is intended (a list of flags).
    # shellcheck disable=SC2086
    exec tritonserver \
        --model-repository="$repo" \
        --http-port="$NIRVANA_HTTP_PORT" \
        --grpc-port="$NIRVANA_GRPC_PORT" \
        --metrics-port="$NIRVANA_METRICS_PORT" \
        --allow-metrics=true \
        --exit-on-error=true \
        --grpc-restricted-protocol="$RESTRICTED_APIS:$ADMIN_HEADER=$key" \
        --http-restricted-api="$RESTRICTED_APIS:$ADMIN_HEADER=$key" \
        --grpc-header-forward-pattern="^$NIRVANA_TENANT_HEADER\$" \
        --http-header-forward-pattern="^$NIRVANA_TENANT_HEADER\$" \
        $NIRVANA_TRITON_ARGS
}

case "${1:-build-and-serve}" in
    build) build ;;
    serve) serve ;;
    build-and-serve) build && serve ;;
    *) exec "$@" ;;
esac
