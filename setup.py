"""The one C extension; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # No fused multiply-adds: the ThumbHash must round each product as Python did (see _pixels.c).
        Extension(
            "mediavault.imaging._pixels", ["src/mediavault/imaging/_pixels.c"], extra_compile_args=["-O3", "-ffp-contract=off"]
        ),
    ],
)
