#!/usr/bin/env bash
# Build-time guard: the `tensorrt` wheel that builds the engines must be the TensorRT that Triton loads them with.
# usage: check_tensorrt.sh EXPECTED_VERSION   (e.g. 10.8.0.43)
set -euo pipefail
expected=$1

wheel=$(python3 -c "import tensorrt; print(tensorrt.__version__)")
# The engine build/check path (polygraphy, nirvana_export.tensorrt_build) must import in this image.
python3 -c "import polygraphy, polygraphy.backend.trt, nirvana_export.tensorrt_build; print('polygraphy', polygraphy.__version__)"
if [ "$wheel" != "$expected" ]; then
    echo "tensorrt wheel is $wheel, expected $expected" >&2
    exit 1
fi

# The image's libnvinfer (what Triton's TensorRT backend links): libnvinfer.so.10 -> libnvinfer.so.10.8.0
lib=$(ldconfig -p | awk '/libnvinfer\.so\.[0-9]+ / {print $NF; exit}')
if [ -z "$lib" ]; then
    echo "warning: libnvinfer not found through ldconfig; cannot compare with tensorrt $wheel" >&2
    exit 0
fi
image=$(basename "$(readlink -f "$lib")" | sed 's/^libnvinfer\.so\.//')
case "$wheel" in
    "$image"*) echo "tensorrt $wheel matches the image's libnvinfer $image" ;;
    *) echo "tensorrt wheel $wheel does not match the image's libnvinfer $image: pin TENSORRT_VERSION to it" >&2
       exit 1 ;;
esac
