#!/usr/bin/env bash
# Regenerates the gateway's Go code (gateway/gen/src, a GOPATH tree laid out by the protos'
# go_package paths) and the OpenAPI documents (docs/openapi) from protos/; both are committed.
#
# Debian's protoc-gen-go 1.3.5 takes one Go package per run, hence one protoc run per proto, and
# its well-known types live in github.com/golang/protobuf/ptypes, not in the go_package of
# protoc 3.21's timestamp.proto, struct.proto and wrappers.proto (google.golang.org/protobuf, absent here).
set -euo pipefail
cd "$(dirname "$0")/.."

protos=(protos/mediavault/storage/v1/storage.proto protos/mediavault/media/v1/media.proto)
wkt=Mgoogle/protobuf/timestamp.proto=github.com/golang/protobuf/ptypes/timestamp
wkt+=,Mgoogle/protobuf/struct.proto=github.com/golang/protobuf/ptypes/struct
wkt+=,Mgoogle/protobuf/wrappers.proto=github.com/golang/protobuf/ptypes/wrappers

rm -rf gateway/gen docs/openapi/mediavault
mkdir -p gateway/gen/src docs/openapi
for proto in "${protos[@]}"; do
    protoc -I protos -I third_party/googleapis \
        --go_out=plugins=grpc,"$wkt":gateway/gen/src \
        --grpc-gateway_out=logtostderr=true:gateway/gen/src \
        --swagger_out=logtostderr=true:docs/openapi \
        "$proto"
done
