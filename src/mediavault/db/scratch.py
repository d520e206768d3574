"""Scratch databases on an admin connection: the tests and the benchmarks each work in one of their own."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg


def with_database(dsn: str, name: str) -> str:
    """dsn pointing at the database called name on the same server."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


async def create_database(admin_url: str, prefix: str) -> str:
    """Creates an empty database named prefix_<random> and returns its DSN."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_url, name)


async def drop_database(admin_url: str, dsn: str) -> None:
    """Drops dsn's database, ending the sessions still connected to it."""
    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
