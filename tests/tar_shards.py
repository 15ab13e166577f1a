"""Tar shards built byte by byte for the tests, hostile members included (tarfile writes any
header it is given; it is the reader that must refuse them)."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Member:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""


def build_tar(members: list[Member], compression: Literal["", "gz"] = "") -> bytes:
    """A tar archive of ``members`` in order, gzip-compressed for ``compression`` "gz"."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compression == "gz" else "w") as archive:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = member.type
            info.linkname = member.linkname
            regular = member.type == tarfile.REGTYPE
            info.size = len(member.data) if regular else 0
            archive.addfile(info, io.BytesIO(member.data) if regular else None)
    return buffer.getvalue()
