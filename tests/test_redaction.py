"""No credential or signed URL reaches an error row, an error message or ``_run.json``."""

import json
import uuid

import pytest

from mmfeatures import storage
from mmfeatures.counts import RunCounts
from mmfeatures.errors import ErrorRow, FetchError, Stage
from mmfeatures.job import Job
from mmfeatures.options import parse_options
from mmfeatures.redaction import install_log_redaction, redact, redact_all
from mmfeatures.sources import Input

SECRETS = ("hunter2", "SIGNATURE", "abc123", "tok3n", "s1gn4ture")


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked in {text!r}"


# -- redact ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:hunter2@example.com/a.png", "https://***@example.com/a.png"),
        ("ftp://hunter2@example.com/a.png", "ftp://***@example.com/a.png"),
        ("s3://AKIA:hunter2@bucket/key.wav", "s3://***@bucket/key.wav"),
        (
            "https://bucket.s3.amazonaws.com/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIA%2F20240101&X-Amz-Signature=SIGNATURE",
            "https://bucket.s3.amazonaws.com/a.png?***",
        ),
        (
            "https://storage.googleapis.com/b/a.png?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature=SIGNATURE",
            "https://storage.googleapis.com/b/a.png?***",
        ),
        (
            "https://acct.blob.core.windows.net/c/a.wav?sv=2022-11-02&se=2030-01-01&sp=r&sig=abc123%3D",
            "https://acct.blob.core.windows.net/c/a.wav?***",
        ),
        ("az://container/a.wav?sv=2022&sig=abc123", "az://container/a.wav?***"),
        ("abfs://container@acct.dfs.core.windows.net/a?sig=abc123", "abfs://***@acct.dfs.core.windows.net/a?***"),
        ("gs://bucket/a.png?token=tok3n", "gs://bucket/a.png?***"),
        ("gcs://bucket/a.png#tok3n", "gcs://bucket/a.png?***"),
        ("http://example.com/a?sig=abc123", "http://example.com/a?***"),
        ("HTTPS://u:hunter2@Example.com/a?Sig=abc123", "HTTPS://***@Example.com/a?***"),
        ("https://user:p@ss:hunter2@host:8443/x?sig=abc123#frag", "https://***@host:8443/x?***"),
    ],
)
def test_redact_credential_forms(url, expected):
    assert redact(url) == expected
    assert_no_secret(redact(url))


@pytest.mark.parametrize(
    "text",
    [
        "/data/media/a.png",
        "relative/a.png",
        "C:\\data\\a.png",
        "/data/a?b.png",
        "gs://bucket/dir/a.png",
        "s3://bucket/date=2024-01-01/a.wav",
        "memory://storage-1/a.wav",
        "https://example.com/a.png",
        "https://[::1]:8080/a.png",
        "file:///tmp/a.png",
        "gs://bucket/manifest.jsonl:12",
        "no url here: a plain message (with punctuation).",
        "",
    ],
)
def test_redact_leaves_non_secrets_untouched(text):
    assert redact(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "https://user:hunter2@host/a.png?sig=abc123",
        "could not read https://u:hunter2@h/x?token=tok3n: [Errno 111] refused",
        "gs://b/m.jsonl?X-Goog-Signature=SIGNATURE:12",
        "s3://b/k#frag",
        "https://h/x?",
        "bucket/key?X-Amz-Signature=SIGNATURE",
        "plain /local/path",
    ],
)
def test_redact_is_idempotent(text):
    once = redact(text)
    assert redact(once) == once


def test_redact_url_inside_a_longer_message():
    message = (
        "404, message='Not Found', url='https://u:hunter2@cdn.example.com/v/a.mp4?X-Amz-Signature=SIGNATURE' "
        "after reading gs://bucket/ok.png and (https://h/x?token=tok3n), then /local/file.wav"
    )
    redacted = redact(message)
    assert_no_secret(redacted)
    assert redacted == (
        "404, message='Not Found', url='https://***@cdn.example.com/v/a.mp4?***' "
        "after reading gs://bucket/ok.png and (https://h/x?***), then /local/file.wav"
    )


def test_redact_keeps_sentence_punctuation_and_line_numbers():
    assert redact("could not read https://h/x?sig=abc123: refused") == "could not read https://h/x?***: refused"
    # a manifest row's source is "path:line"; the line survives, the signature does not
    assert redact("https://h/m.jsonl?sig=abc123:17") == "https://h/m.jsonl?***:17"


def test_redact_scheme_less_signed_query():
    # fsspec strips the scheme from some paths it reports
    assert redact("no such key: bucket/a.png?X-Amz-Signature=SIGNATURE") == "no such key: bucket/a.png?***"
    assert redact("blob c/a.wav?sv=2022&sig=abc123 gone") == "blob c/a.wav?*** gone"


def test_redact_all_nested():
    value = {"a": ["https://u:hunter2@h/x", ("gs://b/k?token=tok3n", 3)], "b": None, "c": 1.5}
    assert redact_all(value) == {"a": ["https://***@h/x", ("gs://b/k?***", 3)], "b": None, "c": 1.5}


# -- ErrorRow ----------------------------------------------------------------------------------


def test_error_row_from_exception_is_redacted():
    exc = OSError("could not reach https://user:hunter2@host/a.png?sig=abc123")
    row = ErrorRow.from_exception(
        exc, record_id="r1", modality="image", source="https://user:hunter2@host/a.png?sig=abc123"
    )
    assert_no_secret(json.dumps(row.to_dict()))
    assert row.source == "https://***@host/a.png?***"
    assert row.message == "could not reach https://***@host/a.png?***"
    assert row.error_type == "unexpected_OSError"
    record_error = ErrorRow.from_exception(
        FetchError("no such file: gs://b/a.png?X-Goog-Signature=SIGNATURE", error_type="missing_file"),
        record_id="r1",
        modality="image",
        source="gs://b/a.png?X-Goog-Signature=SIGNATURE",
    )
    assert_no_secret(json.dumps(record_error.to_dict()))
    assert record_error.error_type == "missing_file"


def test_error_row_built_directly_is_redacted():
    row = ErrorRow(
        "r1",
        None,
        Stage.VALIDATE,
        "duplicate_id",
        "id 'r1' first appears at https://h/m.jsonl?sig=abc123:3",
        "s3://k:hunter2@b/m.jsonl:9",
    )
    assert_no_secret(json.dumps(row.to_dict()))
    assert row.message == "id 'r1' first appears at https://h/m.jsonl?***:3"
    assert row.source == "s3://***@b/m.jsonl:9"
    assert ErrorRow("r1", None, Stage.READ, "malformed_row", "bad", None).source is None


# -- storage error messages ----------------------------------------------------------------------


def test_read_bytes_missing_memory_url_has_no_secret():
    url = f"memory://redaction-{uuid.uuid4().hex}/a.png?sig=abc123&token=tok3n"
    with pytest.raises(FetchError) as info:
        storage.read_bytes(url)
    assert info.value.error_type == "missing_file"
    assert_no_secret(str(info.value))
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_read_bytes_refused_https_url_has_no_secret():
    # 127.0.0.1 port 1 refuses at once: nothing leaves this machine
    with pytest.raises(FetchError) as info:
        storage.read_bytes("https://user:hunter2@127.0.0.1:1/x?sig=abc123")
    assert info.value.error_type in ("fetch_failed", "missing_file", "storage_unavailable")
    assert_no_secret(str(info.value))
    assert "127.0.0.1" in str(info.value)
    row = ErrorRow.from_exception(
        info.value, record_id="r", modality="image", source="https://user:hunter2@127.0.0.1:1/x?sig=abc123"
    )
    assert_no_secret(json.dumps(row.to_dict()))


def test_expand_inputs_error_has_no_secret():
    pattern = f"memory://redaction-{uuid.uuid4().hex}/*.jsonl?sig=abc123"
    with pytest.raises(FileNotFoundError) as info:
        storage.expand_inputs([pattern])
    assert_no_secret(str(info.value))


# -- _run.json ---------------------------------------------------------------------------------


def test_job_summary_has_no_secret(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"id": "a", "text": "hello"}\n')
    job = Job.from_options(
        parse_options(
            [
                "--input",
                str(manifest),
                "--output",
                "memory://AKIA:hunter2@bucket/out?X-Amz-Signature=SIGNATURE",
            ]
        )
    )
    # a signed input URL as find_inputs would return it for a URL manifest
    job.inputs.append(Input("https://u:hunter2@h/manifest.jsonl?X-Amz-Signature=SIGNATURE&token=tok3n", "jsonl"))
    job.options["input"] = [*job.options["input"], job.inputs[-1].path]
    summary = job.summary(counts=RunCounts(), features={"rows": 0, "files": 0}, errors={"rows": 0, "files": 0})
    text = json.dumps(summary, default=str)
    assert_no_secret(text)
    assert summary["outputs"]["features"] == "memory://***@bucket/out?***"  # the join went into the query
    assert str(manifest) in summary["inputs"]
    assert summary["options"]["output"] == "memory://***@bucket/out?***"
    assert_no_secret(json.dumps(job.metadata(), default=str))


# -- logs --------------------------------------------------------------------------------------


def test_log_records_are_redacted():
    import io
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logger = logging.getLogger(f"redaction-test-{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.propagate = False
    install_log_redaction(logger)
    install_log_redaction(logger)  # twice adds nothing
    assert len(handler.filters) == 1
    try:
        logger.warning("loaded model %s", "gs://k:hunter2@b/model?X-Goog-Signature=SIGNATURE")
        try:
            raise OSError("could not read https://u:hunter2@h/a.png?sig=abc123")
        except OSError:
            logger.exception("failed on %s", "r1")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert_no_secret(text)
    assert "gs://***@b/model?***" in text
    assert "https://***@h/a.png?***" in text
