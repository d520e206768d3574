#!/usr/bin/env bash
# The npm packages the tests drive (tus-js-client), into .node-test/ (gitignored); a no-op when present.
set -euo pipefail
cd "$(dirname "$0")/.."
TUS_JS_CLIENT_VERSION=4.3.1
if [ -f .node-test/node_modules/tus-js-client/package.json ] && \
   grep -q "\"version\": \"$TUS_JS_CLIENT_VERSION\"" .node-test/node_modules/tus-js-client/package.json; then
    exit 0
fi
mkdir -p .node-test
npm install --silent --no-audit --no-fund --prefix .node-test "tus-js-client@$TUS_JS_CLIENT_VERSION" >/dev/null
