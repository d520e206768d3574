#!/usr/bin/env bash
# Debian packages that build gateway/ (grpc-gateway v1) in GOPATH mode, installed as root; idempotent.
#
# No Go module can be downloaded here, so every Go source comes from Debian's
# /usr/share/gocode: grpc-gateway 1.6.4 (runtime, utilities, the generator's httprule), grpc-go 1.33,
# golang/protobuf 1.3.5 (pulled in by golang-goprotobuf-dev, which also brings
# protoc-gen-go) and genproto (google.golang.org/genproto/googleapis/...).
# golang-grpc-gateway ships protoc-gen-grpc-gateway and protoc-gen-swagger; libprotobuf-dev
# the well-known .proto files (a mere Recommends of protobuf-compiler).
set -euo pipefail

packages=(
    golang-go
    protobuf-compiler
    libprotobuf-dev
    golang-grpc-gateway
    golang-github-grpc-ecosystem-grpc-gateway-dev
    golang-google-grpc-dev
    golang-goprotobuf-dev
    golang-google-genproto-dev
)

exec "$(dirname "$0")/apt-install-missing.sh" "${packages[@]}"
