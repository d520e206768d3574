#!/usr/bin/env bash
# Installs those of the given Debian packages that are not installed yet; runs apt-get
# (and its update) only when something is missing. Needs root only then.
set -euo pipefail

missing=()
for pkg in "$@"; do
    if [ "$(dpkg-query --show --showformat='${db:Status-Status}' "$pkg" 2>/dev/null)" != "installed" ]; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "apt-install-missing: need root to install: ${missing[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
