"""Tests for mmfeatures.storage on real local files and fsspec's memory:// filesystem."""

import os
import uuid

import fsspec
import pytest

from mmfeatures import storage
from mmfeatures.errors import FetchError, Stage


@pytest.fixture
def memory_dir():
    name = f"storage-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


# -- resolve_reference -------------------------------------------------------------------------


def test_resolve_relative_against_local_manifest_dir(tmp_path):
    assert storage.resolve_reference("img/a.png", str(tmp_path)) == os.path.join(str(tmp_path), "img", "a.png")


def test_resolve_relative_against_url_manifest_dir():
    assert storage.resolve_reference("img/a.png", "gs://bucket/data") == "gs://bucket/data/img/a.png"
    assert storage.resolve_reference("a.wav", "memory://x") == "memory://x/a.wav"


@pytest.mark.parametrize("reference", ["/abs/a.png", "gs://b/a.png", "https://host/a.png?x=1", "memory://m/a.wav"])
def test_resolve_absolute_and_urls_unchanged(reference):
    assert storage.resolve_reference(reference, "/some/manifest/dir") == reference
    assert storage.resolve_reference(reference, "s3://bucket/dir") == reference


def test_parent_and_join():
    assert storage.parent("gs://b/dir/m.jsonl") == "gs://b/dir"
    assert storage.parent("rel/m.jsonl") == os.path.join(os.getcwd(), "rel")
    assert storage.join("gs://b", "x", "y") == "gs://b/x/y"


# -- expand_inputs -----------------------------------------------------------------------------


def test_expand_local_glob_sorted_and_files_only(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.csv"):
        (tmp_path / name).write_text("{}\n")
    (tmp_path / "dir.jsonl").mkdir()  # matches the glob but is not a file
    result = storage.expand_inputs([str(tmp_path / "*.jsonl")])
    assert result == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]


def test_expand_plain_path_and_several_patterns_in_order(tmp_path):
    (tmp_path / "z.csv").write_text("id\n")
    (tmp_path / "a.jsonl").write_text("{}\n")
    result = storage.expand_inputs([str(tmp_path / "z.csv"), str(tmp_path / "*.jsonl")])
    assert result == [str(tmp_path / "z.csv"), str(tmp_path / "a.jsonl")]


def test_expand_memory_glob_keeps_scheme(memory_dir):
    for name in ("b.jsonl", "a.jsonl", "other.csv"):
        with fsspec.open(f"{memory_dir}/{name}", "wb") as handle:
            handle.write(b'{"id": 1}\n')
    result = storage.expand_inputs([f"{memory_dir}/*.jsonl"])
    assert len(result) == 2
    assert all(path.startswith("memory://") for path in result)
    assert [path.rsplit("/", 1)[1] for path in result] == ["a.jsonl", "b.jsonl"]
    for path in result:  # each one opens as it is
        assert storage.read_bytes(path) == b'{"id": 1}\n'


@pytest.mark.parametrize("pattern", ["*.jsonl", "missing.jsonl", "sub/*.csv"])
def test_expand_nothing_matched(tmp_path, pattern):
    (tmp_path / "a.csv").write_text("id\n")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        storage.expand_inputs([str(tmp_path / "a.csv"), str(tmp_path / pattern)])


def test_expand_nothing_matched_in_memory(memory_dir):
    with pytest.raises(FileNotFoundError):
        storage.expand_inputs([f"{memory_dir}/*.jsonl"])


# -- read_bytes --------------------------------------------------------------------------------


def test_read_bytes_local_and_memory(tmp_path, memory_dir):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01abc")
    assert storage.read_bytes(str(tmp_path / "a.bin")) == b"\x00\x01abc"
    assert storage.read_bytes(str(tmp_path / "a.bin"), max_bytes=5) == b"\x00\x01abc"
    with fsspec.open(f"{memory_dir}/m.bin", "wb") as handle:
        handle.write(b"hello")
    assert storage.read_bytes(f"{memory_dir}/m.bin", max_bytes=5) == b"hello"


def fetch_error(location, **kwargs):
    with pytest.raises(FetchError) as info:
        storage.read_bytes(location, **kwargs)
    assert info.value.stage == Stage.FETCH
    return info.value


@pytest.mark.parametrize("max_bytes", [None, 100])
def test_read_bytes_missing(tmp_path, memory_dir, max_bytes):
    assert fetch_error(str(tmp_path / "nope.png"), max_bytes=max_bytes).error_type == "missing_file"
    assert fetch_error(f"{memory_dir}/nope.png", max_bytes=max_bytes).error_type == "missing_file"


def test_read_bytes_too_large(tmp_path, memory_dir):
    (tmp_path / "big.bin").write_bytes(b"x" * 11)
    error = fetch_error(str(tmp_path / "big.bin"), max_bytes=10)
    assert error.error_type == "file_too_large"
    assert "10" in str(error)
    with fsspec.open(f"{memory_dir}/big.bin", "wb") as handle:
        handle.write(b"x" * 11)
    assert fetch_error(f"{memory_dir}/big.bin", max_bytes=10).error_type == "file_too_large"


def test_read_bytes_directory(tmp_path):
    assert fetch_error(str(tmp_path)).error_type == "not_a_file"
    # with a size limit the directory is still a FetchError, never an escaped OSError
    fetch_error(str(tmp_path), max_bytes=1)


def test_read_bytes_other_os_error(tmp_path):
    # ENAMETOOLONG is a plain OSError, none of the subclasses with a code of their own
    assert fetch_error(str(tmp_path / ("x" * 300))).error_type == "fetch_failed"


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod 000 does not deny reads to root")
def test_read_bytes_permission_denied(tmp_path):
    path = tmp_path / "secret.bin"
    path.write_bytes(b"x")
    path.chmod(0)
    try:
        assert fetch_error(str(path)).error_type == "permission_denied"
    finally:
        path.chmod(0o600)
