# Package-config shim for distributions whose libprotobuf-dev ships no CMake
# package config (Debian 12, Ubuntu 22.04/24.04). Triton's CMake files call
# find_package(Protobuf CONFIG REQUIRED); build.sh points Protobuf_DIR here and
# this file hands over to CMake's own FindProtobuf module, which provides the
# same targets (protobuf::libprotobuf, protobuf::protoc) and the
# protobuf_generate_cpp() function.
set(protobuf_MODULE_COMPATIBLE TRUE)
find_package(Protobuf MODULE REQUIRED)
set(Protobuf_FOUND TRUE)
set(protobuf_FOUND TRUE)
