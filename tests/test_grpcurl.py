"""What an operator types: the real grpcurl binary against a running server, through reflection only."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"


async def grpcurl(server, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        GRPCURL, "-plaintext", *args[:-1], f"127.0.0.1:{server.grpc_port}", *args[-1:],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode, out.decode(), err.decode()


async def test_list_shows_both_services(server):
    code, out, err = await grpcurl(server, "list")
    assert code == 0, err
    assert {"mediavault.storage.v1.StorageService", "mediavault.media.v1.MediaService", "grpc.health.v1.Health"} <= set(out.split())


async def test_health_check_is_serving(server):
    code, out, err = await grpcurl(server, "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}


async def test_begin_upload_with_a_token(server, authenticator, user_id):
    token = authenticator.issue(user_id, ["user"])
    body = json.dumps({"filename": "a.jpg", "content_type": "image/jpeg", "size_bytes": 1024, "retention": "RETENTION_EPHEMERAL"})
    code, out, err = await grpcurl(
        server, "-H", f"authorization: Bearer {token}", "-d", body, "mediavault.storage.v1.StorageService/BeginUpload"
    )
    assert code == 0, err
    response = json.loads(out)
    assert response["upload"]["state"] == "UPLOAD_STATE_PENDING"
    assert response["upload"]["retention"] == "RETENTION_EPHEMERAL"
    assert response["upload_method"] == "PUT"
    assert response["upload_url"].startswith("http://")


async def test_errors_show_code_and_error_info(server):
    code, _, err = await grpcurl(server, "-format-error", "mediavault.storage.v1.StorageService/GetStorageSummary")
    assert code != 0
    status = json.loads(err)
    assert status["code"] == 16
    assert status["details"] == [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "domain": "mediavault", "reason": "UNAUTHORIZED"}
    ]
