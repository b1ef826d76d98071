#!/bin/sh
# Regenerate the Python protobuf modules of the containerd snapshots API.
#
# Run from anywhere after editing agent/snapshotter/proto/*.proto; needs grpcio-tools
# (the `dev` extra). Writes <name>_pb2.py plus a typed <name>_pb2.pyi next to each
# .proto. The proto files import each other by repository-relative path, so the
# generated modules import each other as `agent.snapshotter.proto.<name>_pb2`.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-"$repo/.venv/bin/python"}
cd "$repo"
"$python" -m grpc_tools.protoc \
    --proto_path=. \
    --python_out=. \
    --pyi_out=. \
    agent/snapshotter/proto/mount.proto \
    agent/snapshotter/proto/snapshots.proto
"$python" -m grpc_tools.protoc \
    --proto_path=. \
    --python_out=. \
    --pyi_out=. \
    accelctl/cri/cri_images.proto
