#!/usr/bin/env bash
# Build NVIDIA's perf_analyzer (gRPC + HTTP clients only, no GPU, no C API)
# from its public source against the distribution's packages (Debian 12 /
# Ubuntu 22.04+). See README.md beside this script.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Triton 2.51.0 (the tritonserver inside nvidia-pytriton 0.7.0) == release r24.10.
TAG="r24.10"
PA_VERSION="2.51.0"
REPO_ORG="https://github.com/triton-inference-server"
REPOS=(perf_analyzer client common core)
BUILD_DIR="${PWD}/perf_analyzer-build"
PREFIX=""
SRC=""
JOBS=2
DO_APT=1

APT_PACKAGES=(
  build-essential cmake git pkg-config
  libgrpc++-dev libgrpc-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev
  libabsl-dev libc-ares-dev libre2-dev libssl-dev zlib1g-dev
  libcurl4-openssl-dev rapidjson-dev libb64-dev
)

usage() {
  cat <<EOF
Usage: $(basename "$0") [options]

Builds perf_analyzer ${PA_VERSION} (branch ${TAG} of ${REPO_ORG}/{perf_analyzer,client,common,core})
against system gRPC/protobuf/curl, with the gRPC and HTTP clients only (no CUDA,
no C API, no TF-Serving/TorchServe/OpenAI backends, no unit tests, no Python).

Options:
  --build-dir DIR   where sources are cloned and the build runs
                    (default: ./perf_analyzer-build)
  --prefix DIR      where the binary goes: DIR/bin/perf_analyzer
                    (default: <build-dir>/install)
  --src DIR         use pre-fetched clones instead of cloning from GitHub:
                    DIR/perf_analyzer, DIR/client, DIR/common, DIR/core
                    (plain or bare git repos, or NAME.git); each must contain
                    the branch/tag given by --tag. They are cloned locally, never modified.
  --tag REF         branch or tag of all four repos (default: ${TAG})
  --pa-version V    version string compiled into the binary (default: ${PA_VERSION})
  --repo-org URL    where the four repos live (default: ${REPO_ORG})
  -j, --jobs N      parallel compile jobs (default: ${JOBS}); compiles run under nice -n 10
  --no-apt          don't install packages; only check that the tools are there.
                    The packages needed are:
                      ${APT_PACKAGES[*]}
  -h, --help        this text

Example:
  $(basename "$0") --build-dir /tmp/pa --prefix \$HOME/.local/perf_analyzer
  \$HOME/.local/perf_analyzer/bin/perf_analyzer --version
EOF
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --build-dir|--prefix|--src|--tag|--pa-version|--repo-org|-j|--jobs)
      [[ $# -ge 2 ]] || { echo "$1 needs a value (see --help)" >&2; exit 2; } ;;&
    --build-dir) BUILD_DIR="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --src) SRC="$2"; shift 2 ;;
    --tag) TAG="$2"; shift 2 ;;
    --pa-version) PA_VERSION="$2"; shift 2 ;;
    --repo-org) REPO_ORG="$2"; shift 2 ;;
    -j|--jobs) JOBS="$2"; shift 2 ;;
    --no-apt) DO_APT=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

mkdir -p "${BUILD_DIR}"
BUILD_DIR="$(cd "${BUILD_DIR}" && pwd)"
PREFIX="${PREFIX:-${BUILD_DIR}/install}"
mkdir -p "${PREFIX}"
PREFIX="$(cd "${PREFIX}" && pwd)"
SRC_DIR="${BUILD_DIR}/src"
CLIENTS_INSTALL="${BUILD_DIR}/cc-clients-install"
log() { echo "==> $*"; }

# ---------------------------------------------------------------- packages
if [[ ${DO_APT} -eq 1 ]]; then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
      echo "not root and no sudo: install these packages, then rerun with --no-apt:" >&2
      echo "  apt-get install ${APT_PACKAGES[*]}" >&2
      exit 1
    fi
  fi
  log "apt-get install ${APT_PACKAGES[*]}"
  ${SUDO} env DEBIAN_FRONTEND=noninteractive apt-get update -q
  ${SUDO} env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}"
fi
missing=()
for t in cmake git c++ protoc grpc_cpp_plugin; do
  command -v "$t" >/dev/null || missing+=("$t")
done
for h in rapidjson/document.h b64/cencode.h curl/curl.h re2/re2.h grpcpp/grpcpp.h; do
  echo "#include <$h>" | c++ -std=c++17 -E -x c++ - >/dev/null 2>&1 || missing+=("$h")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "missing: ${missing[*]}" >&2
  echo "install: apt-get install ${APT_PACKAGES[*]}" >&2
  exit 1
fi

# ---------------------------------------------------------------- sources
mkdir -p "${SRC_DIR}"
for r in "${REPOS[@]}"; do
  dest="${SRC_DIR}/${r}"
  if [[ -n "${SRC}" ]]; then
    origin="${SRC}/${r}"
    [[ -e "${origin}" ]] || origin="${SRC}/${r}.git"
    [[ -e "${origin}" ]] || { echo "--src: no ${SRC}/${r} or ${SRC}/${r}.git" >&2; exit 1; }
    origin="$(cd "${origin}" && pwd)"
  else
    origin="${REPO_ORG}/${r}.git"
  fi
  if [[ -d "${dest}/.git" ]]; then
    have="$(git -C "${dest}" rev-parse --abbrev-ref HEAD 2>/dev/null || true)"
    if [[ "${have}" != "${TAG}" ]] && ! git -C "${dest}" describe --tags --exact-match 2>/dev/null | grep -qx "${TAG}"; then
      echo "${dest} exists but is not at ${TAG}; remove it or use another --build-dir" >&2
      exit 1
    fi
    log "reusing ${dest}"
  else
    log "clone ${origin} @ ${TAG}"
    git clone -q --depth 1 --branch "${TAG}" "$([[ -n "${SRC}" ]] && echo "file://${origin}" || echo "${origin}")" "${dest}"
  fi
  echo "    ${r}: $(git -C "${dest}" log -1 --format='%h %cs %s')"
done

# Patches: applied once (idempotent on a rerun).
# patches/<repo>-<what>.patch applies to <repo>.
for r in "${REPOS[@]}"; do
  for p in "${SCRIPT_DIR}/patches/${r}"-*.patch; do
    [[ -e "$p" ]] || continue
    if git -C "${SRC_DIR}/${r}" apply --reverse --check "$p" 2>/dev/null; then
      log "already applied: $(basename "$p")"
    else
      log "apply $(basename "$p")"
      git -C "${SRC_DIR}/${r}" apply "$p"
    fi
  done
done

# Common CMake settings: no network (FetchContent served from the clones),
# protobuf through the shim in cmake/ (Debian ships no protobuf-config.cmake).
COMMON_ARGS=(
  -DCMAKE_BUILD_TYPE=Release
  -DTRITON_MIN_CXX_STANDARD=17
  -DTRITON_ENABLE_GPU=OFF
  -DTRITON_ENABLE_CC_HTTP=ON
  -DTRITON_ENABLE_CC_GRPC=ON
  -DTRITON_ENABLE_ZLIB=ON
  -DTRITON_COMMON_ENABLE_PROTOBUF_PYTHON=OFF
  -DTRITON_COMMON_ENABLE_TESTS=OFF
  -DTRITON_REPO_ORGANIZATION="${REPO_ORG}"
  -DTRITON_COMMON_REPO_TAG="${TAG}"
  -DTRITON_CORE_REPO_TAG="${TAG}"
  -DFETCHCONTENT_FULLY_DISCONNECTED=ON
  -DFETCHCONTENT_SOURCE_DIR_REPO-COMMON="${SRC_DIR}/common"
  -DFETCHCONTENT_SOURCE_DIR_REPO-CORE="${SRC_DIR}/core"
  -DProtobuf_DIR="${SCRIPT_DIR}/cmake"
)

# ---------------------------------------------------------------- C++ client libraries
log "configure client/src/c++ (libgrpcclient, libhttpclient)"
cmake -S "${SRC_DIR}/client/src/c++" -B "${BUILD_DIR}/cc-clients" \
  "${COMMON_ARGS[@]}" \
  -DCMAKE_INSTALL_PREFIX="${CLIENTS_INSTALL}" \
  -DTRITON_USE_THIRD_PARTY=OFF \
  -DTRITON_ENABLE_EXAMPLES=OFF \
  -DTRITON_ENABLE_TESTS=OFF
log "build client libraries"
nice -n 10 cmake --build "${BUILD_DIR}/cc-clients" -j "${JOBS}"
cmake --install "${BUILD_DIR}/cc-clients" >/dev/null

# ---------------------------------------------------------------- perf_analyzer
# perf_analyzer/src looks for the client headers/libs under CMAKE_INSTALL_PREFIX.
log "configure perf_analyzer/src"
cmake -S "${SRC_DIR}/perf_analyzer/src" -B "${BUILD_DIR}/perf_analyzer" \
  "${COMMON_ARGS[@]}" \
  -DCMAKE_INSTALL_PREFIX="${CLIENTS_INSTALL}" \
  -DPERF_ANALYZER_VERSION="${PA_VERSION}" \
  -DPERF_ANALYZER_ENABLE_UNIT_TESTS=OFF \
  -DTRITON_ENABLE_PERF_ANALYZER_C_API=OFF \
  -DTRITON_ENABLE_PERF_ANALYZER_TFS=OFF \
  -DTRITON_ENABLE_PERF_ANALYZER_TS=OFF \
  -DTRITON_ENABLE_PERF_ANALYZER_OPENAI=OFF
log "build perf_analyzer"
nice -n 10 cmake --build "${BUILD_DIR}/perf_analyzer" -j "${JOBS}" --target perf_analyzer

mkdir -p "${PREFIX}/bin"
install -m 755 "${BUILD_DIR}/perf_analyzer/perf_analyzer" "${PREFIX}/bin/perf_analyzer"
"${PREFIX}/bin/perf_analyzer" --version >/dev/null  # a binary that cannot start fails the build here
log "done: ${PREFIX}/bin/perf_analyzer"
echo "${PREFIX}/bin/perf_analyzer"
