"""Two-phase uploads: reserve at begin, verify and commit at finalize, release on failure.

The package splits the aggregate by concern: ``records`` (what an upload is),
``validation`` (what a request and an object must be), ``statements`` (its SQL, one
definition per guard), ``batches`` (concurrent calls in one statement), ``streaming``
(bytes sent through the service), ``resumable`` (chunks appended from any replica, tus) and ``machine`` (the ``Uploads`` service: the states
and their transitions).
"""

from mediavault.domain.uploads.machine import Uploads
from mediavault.domain.uploads.records import BeginRequest, BeginResult, Upload, object_key_for
from mediavault.domain.uploads.resumable import ChunkChecksum, PartRequest, PresignedPart, Resumable
from mediavault.domain.uploads.validation import Observed, check_object, validate_begin

__all__ = [
    "BeginRequest",
    "BeginResult",
    "ChunkChecksum",
    "Observed",
    "PartRequest",
    "PresignedPart",
    "Resumable",
    "Upload",
    "Uploads",
    "check_object",
    "object_key_for",
    "validate_begin",
]
