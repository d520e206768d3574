#!/usr/bin/env bash
# Installs the imaging stack into a virtualenv: pillow-simd built from source for
# this CPU, then pillow-heif without its dependencies.
#
# Usage: scripts/install-imaging.sh VENV_DIR [LOCK_FILE]
#
# Run it after scripts/install-system-deps.sh and before `pip install --editable .`:
# pillow-simd ships no wheels, and pillow-heif declares a dependency on stock `pillow`,
# which installs over the same PIL/ package and would silently replace pillow-simd.
# Versions come from LOCK_FILE (default: requirements.lock at the repository root).
# The compiled wheel is cached (MEDIAVAULT_WHEELHOUSE, default ~/.cache/mediavault/wheels)
# under its version, instruction set and build options, so only the first run builds.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 VENV_DIR [LOCK_FILE]" >&2
    exit 2
fi
venv=$1
lock=${2:-"$(cd "$(dirname "$0")/.." && pwd)/requirements.lock"}
py="$venv/bin/python"

pin() {
    # pip freeze spells some names with "_", people with "-": accept both.
    local name=${1//[-_]/[-_]}
    sed -n "s/^$name==\([^ ;#]*\).*/\1/Ip" "$lock" | head -n 1
}
simd_version=$(pin pillow-simd)
heif_version=$(pin pillow-heif)
if [ -z "$simd_version" ] || [ -z "$heif_version" ]; then
    echo "install-imaging: $lock must pin pillow-simd==... and pillow-heif==..." >&2
    exit 1
fi

# -mavx2 turns on pillow-simd's AVX2 paths (resampling, filters, 3D colour LUTs);
# a binary built with it crashes (SIGILL) on a CPU without AVX2, hence the check.
if grep -qw avx2 /proc/cpuinfo; then
    flavour=avx2
    compiler="cc -mavx2"
else
    flavour=sse4
    compiler="cc"
fi
# jpeg, zlib, webp and lcms are required, so that a missing -dev package fails the build
# instead of producing a PIL that cannot write WebP. Every other codec is left out
# whatever -dev packages the machine happens to have: none is in the upload allow-list,
# and the build links the same libraries on every machine.
build_options=(
    jpeg=enable zlib=enable webp=enable lcms=enable
    tiff=disable freetype=disable raqm=disable jpeg2000=disable imagequant=disable xcb=disable avif=disable
)
build_key=$(printf '%s ' "$compiler" "${build_options[@]}" | sha256sum | cut -c1-12)
wheelhouse="${MEDIAVAULT_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/mediavault/wheels}/pillow-simd-$simd_version-$flavour-$build_key"

# Stock Pillow and pillow-simd own the same files: uninstalling one after installing
# the other deletes the files both share, so stock Pillow goes first and pillow-simd
# is always (re)installed after it.
if "$py" -m pip show --quiet pillow 2>/dev/null; then
    "$py" -m pip uninstall --yes --quiet pillow
fi

if ! compgen -G "$wheelhouse/pillow_simd-*.whl" >/dev/null; then
    rm -rf "$wheelhouse.partial"
    # --no-cache-dir: pip's wheel cache ignores CC, so it could hand back a build made
    # without -mavx2.
    CC="$compiler" "$py" -m pip wheel --quiet --no-deps --no-cache-dir \
        --no-binary pillow-simd \
        "${build_options[@]/#/--config-settings=}" \
        --wheel-dir "$wheelhouse.partial" "pillow-simd==$simd_version"
    mv "$wheelhouse.partial" "$wheelhouse"
fi
"$py" -m pip install --quiet --no-deps --no-index --force-reinstall "$wheelhouse"/pillow_simd-*.whl
"$py" -m pip install --quiet --no-deps "pillow-heif==$heif_version"

"$py" - "$simd_version" <<'PY'
import importlib.metadata
import sys

import PIL
from PIL import features

expected = sys.argv[1]
problems = []
if PIL.__version__ != expected:
    problems.append(f"PIL is {PIL.__version__}, expected pillow-simd {expected}")
try:
    importlib.metadata.distribution("pillow")
    problems.append("stock pillow is installed beside pillow-simd")
except importlib.metadata.PackageNotFoundError:
    pass
for feature in ("jpg", "libjpeg_turbo", "zlib", "webp", "littlecms2"):
    if not features.check(feature):
        problems.append(f"PIL feature {feature} is missing")
import pillow_heif  # noqa: E402  imported last: it must not have replaced PIL

if problems:
    sys.exit("install-imaging: " + "; ".join(problems))
print(f"install-imaging: pillow-simd {PIL.__version__}, pillow-heif {pillow_heif.__version__}")
PY
