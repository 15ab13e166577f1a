"""The error row and the error types: every failure in the job becomes one of these values.

Stages never let an exception escape for a bad record: they catch ``RecordError`` (or anything
else) and emit an ``ErrorRow`` on their ``errors`` tagged output, so one bad file cannot fail a run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mmfeatures.redaction import redact

ERRORS_TAG = "errors"


class Stage:
    READ = "read"
    VALIDATE = "validate"
    FETCH = "fetch"
    DECODE = "decode"
    PREPROCESS = "preprocess"
    ENCODE = "encode"


class ConfigurationError(ValueError):
    """The job's options cannot work (missing input, no matching file, unknown model...)."""


class RecordError(Exception):
    """A failure that belongs to one record (or one of its modalities), with a stable code."""

    stage: str = Stage.VALIDATE
    error_type: str = "invalid_record"

    def __init__(self, message: str, *, error_type: str | None = None):
        super().__init__(message)
        if error_type:
            self.error_type = error_type


class ManifestError(RecordError):
    stage = Stage.READ
    error_type = "malformed_row"


class ValidationError(RecordError):
    stage = Stage.VALIDATE
    error_type = "invalid_record"


class FetchError(RecordError):
    stage = Stage.FETCH
    error_type = "fetch_failed"


class DecodeError(RecordError):
    stage = Stage.DECODE
    error_type = "decode_failed"


class PreprocessError(RecordError):
    stage = Stage.PREPROCESS
    error_type = "preprocess_failed"


class EncodeError(RecordError):
    stage = Stage.ENCODE
    error_type = "encode_failed"


@dataclass(frozen=True)
class ErrorRow:
    """One row of the error table (``schemas/v1/errors.json``).

    ``message`` and ``source`` are redacted on construction (however the row is built): a signed
    URL or a URL's ``user:password@`` never reaches the error table. Text that is not valid Unicode
    (a lone surrogate from JSON, a tar member name that is not UTF-8) is escaped, so that the row
    can always be written."""

    id: str | None
    modality: str | None
    stage: str
    error_type: str
    message: str
    source: str | None

    def __post_init__(self) -> None:
        for name in ("id", "message", "source"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = value.encode("utf-8", "backslashreplace").decode("utf-8")
                object.__setattr__(self, name, value if name == "id" else redact(value))

    @classmethod
    def from_exception(
        cls,
        exc: BaseException,
        *,
        record_id: str | None,
        modality: str | None,
        source: str | None,
        stage: str | None = None,
    ) -> ErrorRow:
        """An error row for ``exc``; unexpected exceptions keep their class name as the type."""
        if isinstance(exc, RecordError):
            return cls(record_id, modality, exc.stage, exc.error_type, str(exc), source)
        return cls(
            record_id,
            modality,
            stage or Stage.PREPROCESS,
            f"unexpected_{type(exc).__name__}",
            str(exc) or type(exc).__name__,
            source,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
