"""The imaging stack is installed as scripts/install-imaging.sh leaves it."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
from pathlib import Path

import PIL
import pytest
from PIL import Image, features

import mediavault.imaging  # noqa: F401  registers the HEIF and AVIF openers


def test_pil_is_pillow_simd() -> None:
    # pillow-simd versions are Pillow's plus a .postN suffix, and its dist-info owns PIL/.
    assert PIL.__version__ == importlib.metadata.version("pillow-simd")
    assert ".post" in PIL.__version__
    owned = {str(f) for f in importlib.metadata.distribution("pillow-simd").files}
    assert "PIL/__init__.py" in owned
    assert "PIL/_imaging.cpython-311-x86_64-linux-gnu.so" in owned


def test_pillow_heif_did_not_pull_stock_pillow() -> None:
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("pillow")
    assert importlib.metadata.version("pillow-heif")
    requires = importlib.metadata.requires("pillow-heif") or []
    assert any(r.lower().startswith("pillow") for r in requires), "premise: pillow-heif asks for stock pillow"


@pytest.mark.parametrize("feature", ["jpg", "libjpeg_turbo", "zlib", "webp", "littlecms2"])
def test_codecs_are_built_in(feature: str) -> None:
    assert features.check(feature)


def test_heif_and_avif_openers_are_registered() -> None:
    assert Image.OPEN["HEIF"][0].__module__.startswith("pillow_heif")
    assert Image.OPEN["AVIF"][0].__module__.startswith("pillow_avif")


@pytest.mark.skipif("avx2" not in Path("/proc/cpuinfo").read_text(), reason="this CPU has no AVX2")
def test_resampling_is_compiled_with_avx2() -> None:
    objdump = shutil.which("objdump")
    assert objdump, "objdump comes with build-essential (scripts/install-system-deps.sh)"
    library = Path(PIL.__file__).parent / "_imaging.cpython-311-x86_64-linux-gnu.so"
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                             check=True).stdout
    # 256-bit integer multiply-adds only appear when the compiler was given -mavx2.
    assert "vpmaddwd %ymm" in listing
