#!/usr/bin/env bash
# Debian packages the imaging stack and `make check` need, installed as root; idempotent.
#
# pillow-simd ships no wheels, so it is compiled here against Debian's codecs:
# libjpeg-turbo (fast JPEG decode, draft/DCT scaling), libwebp (alpha variants),
# zlib (PNG), lcms2 (ICC profile -> sRGB). libturbojpeg0 is the same libjpeg-turbo's
# TurboJPEG API, which mediavault.imaging.turbojpeg loads at run time to decode JPEGs
# to YCbCr planes and encode from them. libjpeg62-turbo-dev's headers also build the
# _jpegtran extension (setup.py), which links the same libjpeg for its transcoding API
# (the lossless display's optimal Huffman tables). TIFF, JPEG 2000, FreeType and the rest
# are left out on purpose: none of them is in the upload allow-list.
# pillow-heif, av (FFmpeg) and pyvips-binary come as manylinux wheels that carry
# their own native libraries, so they need nothing from here.
# prometheus brings promtool, which `make check` and tests/test_deploy.py run on the
# alerting rules (the server it also installs is never started here).
# libjpeg-turbo-progs brings djpeg, a reference decoder that tests/imaging/test_broken.py holds JPEGs to.
# ffmpeg (with ffprobe, libx264 and zscale/tonemap through libzimg) transcodes videos to their
# H.264 renditions: mediavault.video runs it as a supervised subprocess (see docs/video.md).
# pgbouncer (1.18) is what the tests and bench/upload_flow.py --pooler pgbouncer run in front
# of PostgreSQL, each its own on a free port (mediavault.devservers.pgbouncer); the system
# PgBouncer the package may start on 6432 is stopped and disabled when it is first installed.
# nodejs and npm run tus-js-client in tests/test_tus_clients.py (scripts/install-test-node-deps.sh)
# and buf (npx) in `make check`.
set -euo pipefail

packages=(
    build-essential
    pkg-config
    libjpeg62-turbo-dev
    zlib1g-dev
    libwebp-dev
    liblcms2-dev
    libturbojpeg0
    prometheus
    libjpeg-turbo-progs
    pgbouncer
    ffmpeg
    nodejs
)
# Debian's nodejs comes without npm; NodeSource's carries its own and conflicts with Debian's npm.
command -v npx >/dev/null || packages+=(npm)

pgbouncer_was_installed=$(dpkg-query --show --showformat='${db:Status-Status}' pgbouncer 2>/dev/null || true)

"$(dirname "$0")/apt-install-missing.sh" "${packages[@]}"

if [ "$pgbouncer_was_installed" != "installed" ]; then
    if [ -d /run/systemd/system ]; then
        systemctl disable --now pgbouncer.service >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/pgbouncer ]; then
        /etc/init.d/pgbouncer stop >/dev/null 2>&1 || true
        update-rc.d pgbouncer disable >/dev/null 2>&1 || true
    fi
fi
