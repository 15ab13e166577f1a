"""Tar shards built byte by byte for the tests, hostile members included (tarfile writes any
header it is given; it is the reader that must refuse them)."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Member:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""


def build_tar(members: list[Member], compression: str = "") -> bytes:
    """A tar archive of ``members`` in order; ``compression`` is "" or "gz"."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}" if compression else "w") as archive:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = member.type
            info.linkname = member.linkname
            regular = member.type == tarfile.REGTYPE
            info.size = len(member.data) if regular else 0
            archive.addfile(info, io.BytesIO(member.data) if regular else None)
    return buffer.getvalue()
