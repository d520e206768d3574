#!/usr/bin/env bash
# scripts/test-sanitized.sh [PYTHON [PYTEST ARGS...]]
#
# The imaging tests (or the pytest arguments given) against the C extensions (_pixels, _jpegtran)
# built with AddressSanitizer and UndefinedBehaviorSanitizer: a read or write outside a buffer, or
# undefined behaviour, in them or in what they hand libjpeg and TurboJPEG, aborts the test process.
# The extensions are built in a copy of src/, which PYTHONPATH puts before the editable install;
# the tree's own stay as they were built.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
shift $(($# > 0 ? 1 : 0))
[ $# -gt 0 ] || set -- tests/imaging

runtimes=()
for library in libasan.so libubsan.so; do
    path=$(gcc -print-file-name="$library")
    [ -f "$path" ] || { echo "gcc has no $library (Debian: libasan8, libubsan1)" >&2; exit 1; }
    runtimes+=("$path")
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r setup.py pyproject.toml README.md src "$work/"
find "$work/src" -name '*.so' -delete
sanitizers="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
(cd "$work" && CFLAGS="-g $sanitizers" LDFLAGS="$sanitizers" "$OLDPWD/$python" setup.py -q build_ext --inplace)

# ffmpeg and ffprobe run under a memory cap, exec'd through prlimit, which ASan's shadow memory
# alone passes, and they are not what this looks for: this prlimit execs the real one without the
# sanitizer runtimes, for it and what it execs.
# Readable by every user: a test runs ffmpeg as nobody (through setpriv), whose PATH lookup of
# prlimit must find this one, not pass over a folder only root may enter (mktemp's 0700).
mkdir "$work/bin"
printf '#!/bin/sh\nunset LD_PRELOAD\nexec %s "$@"\n' "$(command -v prlimit)" > "$work/bin/prlimit"
chmod 755 "$work" "$work/bin" "$work/bin/prlimit"

# CPython allocates for good at start-up and never frees: leaks are not what this looks for.
# The transcoding processes' memory limit is tested by `make test` alone: ASan keeps freed memory
# mapped (its quarantine), so a process that reached its limit has none left to answer with.
PATH="$work/bin:$PATH" LD_PRELOAD="${runtimes[*]}" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 PYTHONPATH="$work/src" \
    "$python" -m pytest -q -p no:cacheprovider \
    --deselect tests/imaging/test_runner.py::test_a_job_past_the_memory_limit_fails_as_too_large_and_the_pool_recovers "$@"
