"""The C extensions; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # No fused multiply-adds: the ThumbHash must round each product as Python did (see _pixels.c).
        Extension(
            "mediavault.imaging._pixels", ["src/mediavault/imaging/_pixels.c"], extra_compile_args=["-O3", "-ffp-contract=off"]
        ),
        # libjpeg's transcoding API, from Debian's libjpeg62-turbo-dev (scripts/install-system-deps.sh).
        Extension(
            "mediavault.imaging._jpegtran", ["src/mediavault/imaging/_jpegtran.c"], libraries=["jpeg"], extra_compile_args=["-O3"]
        ),
    ],
)
