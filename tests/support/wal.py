"""Reading a SQLite file's WAL index (the -shm file), by SQLite's documented format."""

from __future__ import annotations

import struct
from pathlib import Path

from store.engine import Database


def _header_field(db: Database, offset: int) -> int:
    header = Path(f"{db.engine.url.database}-shm").read_bytes()[: offset + 4]
    value: int = struct.unpack_from("=I", header, offset)[0]  # native byte order
    return value


def frames(db: Database) -> int:
    """`mxFrame`: the frames in the WAL."""
    return _header_field(db, 16)


def copied(db: Database) -> int:
    """`nBackfill`: the frames already copied into the database file."""
    return _header_field(db, 96)


def salt(db: Database) -> bytes:
    """`aSalt`: SQLite draws new salts each time the WAL starts over."""
    return Path(f"{db.engine.url.database}-shm").read_bytes()[32:40]
