"""A SHA-256 whose running state can be saved and taken up again in another process.

A resumable upload carries its hash from chunk to chunk through PostgreSQL, so that
finalize never reads the object again and any replica can take the next chunk. hashlib
cannot export its state, and `rehash` (which pickled it) refuses OpenSSL 3. OpenSSL's
low-level SHA256_Init/Update/Final still operate on a plain SHA256_CTX struct (eight
state words, the bit count, the partial block and its fill), whose bytes are the state:
the same OpenSSL on the same architecture takes them up exactly. The saved form starts
with a tag naming the layout, so a state from another layout is refused, not misread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# sizeof(SHA256_CTX): SHA_LONG h[8], Nl, Nh, data[16]; unsigned int num, md_len.
_CTX_BYTES = 112
_TAG = f"openssl-sha256-ctx/{sys.byteorder}/".encode()


class StateError(ValueError):
    """Saved bytes that are not a state this module wrote."""


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("crypto")
    if name is None:
        raise ImportError("libcrypto (OpenSSL) is required for resumable SHA-256")
    lib = ctypes.CDLL(name)
    lib.SHA256_Init.argtypes = [ctypes.c_void_p]
    lib.SHA256_Update.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.SHA256_Final.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    for function in (lib.SHA256_Init, lib.SHA256_Update, lib.SHA256_Final):
        function.restype = ctypes.c_int
    return lib


_LIB = _load()


class Sha256:
    """hashlib.sha256's update/hexdigest, plus save() and Sha256.restore()."""

    def __init__(self) -> None:
        self._ctx = ctypes.create_string_buffer(_CTX_BYTES)
        if _LIB.SHA256_Init(self._ctx) != 1:
            raise RuntimeError("SHA256_Init failed")

    @classmethod
    def restore(cls, saved: bytes) -> Sha256:
        if not saved.startswith(_TAG) or len(saved) != len(_TAG) + _CTX_BYTES:
            raise StateError("not a saved SHA-256 state of this platform")
        hasher = cls.__new__(cls)
        hasher._ctx = ctypes.create_string_buffer(saved[len(_TAG) :], _CTX_BYTES)
        return hasher

    def save(self) -> bytes:
        return _TAG + self._ctx.raw

    def update(self, data: bytes) -> None:
        if data and _LIB.SHA256_Update(self._ctx, data, len(data)) != 1:
            raise RuntimeError("SHA256_Update failed")

    def hexdigest(self) -> str:
        # Final destroys the context it finishes: finish a copy, so the hasher stays usable.
        ctx = ctypes.create_string_buffer(self._ctx.raw, _CTX_BYTES)
        out = ctypes.create_string_buffer(32)
        if _LIB.SHA256_Final(out, ctx) != 1:
            raise RuntimeError("SHA256_Final failed")
        return out.raw.hex()
