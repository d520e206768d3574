#!/usr/bin/env bash
# Builds gateway/bin/mediavault-gateway in GOPATH mode: the generated code in gateway/gen,
# everything else from Debian's Go sources (scripts/install-gateway-deps.sh); no module download.
set -euo pipefail
cd "$(dirname "$0")"

GO111MODULE=off GOPATH="$PWD/gen:/usr/share/gocode" go build -o bin/mediavault-gateway .
