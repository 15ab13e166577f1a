"""Tests for mmfeatures.storage on real local files and fsspec's memory:// filesystem."""

import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from mmfeatures import storage
from mmfeatures.errors import ConfigurationError, FetchError, Stage


@pytest.fixture
def memory_dir() -> Iterator[str]:
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


def test_expand_webdataset_brace_patterns_locally_and_remotely(tmp_path, memory_dir):
    """``part-{000000..000002}.tar`` names each shard, as WebDataset and img2dataset write them."""
    for index in range(4):
        (tmp_path / f"part-{index:06d}.tar").write_bytes(b"")
        with fsspec.open(f"{memory_dir}/part-{index:06d}.tar", "wb") as handle:
            handle.write(b"")
    local = storage.expand_inputs([str(tmp_path / "part-{000000..000002}.tar")])
    assert local == [str(tmp_path / f"part-{index:06d}.tar") for index in range(3)]
    remote = storage.expand_inputs([f"{memory_dir}/part-{{000001..000003}}.tar"])
    assert [path.rsplit("/", 1)[1] for path in remote] == [f"part-{index:06d}.tar" for index in (1, 2, 3)]
    assert all(path.startswith("memory://") for path in remote)


def test_expand_braces_with_globs_in_the_order_written(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        for name in ("b.jsonl", "a.jsonl"):
            (tmp_path / split / name).write_text("{}\n")
    result = storage.expand_inputs([str(tmp_path / "{val,train}" / "*.jsonl")])
    assert result == [str(tmp_path / split / name) for split in ("val", "train") for name in ("a.jsonl", "b.jsonl")]


def test_a_brace_pattern_with_a_missing_shard_fails_before_any_work(tmp_path):
    for index in (0, 1, 3):
        (tmp_path / f"part-{index:06d}.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="part-000002.tar' matches no file"):
        storage.expand_inputs([str(tmp_path / "part-{000000..000003}.tar")])


# -- read_bytes --------------------------------------------------------------------------------


def test_read_bytes_local_and_memory(tmp_path, memory_dir):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01abc")
    assert storage.read_bytes(str(tmp_path / "a.bin")) == b"\x00\x01abc"
    assert storage.read_bytes(str(tmp_path / "a.bin"), max_bytes=5) == b"\x00\x01abc"
    with fsspec.open(f"{memory_dir}/m.bin", "wb") as handle:
        handle.write(b"hello")
    assert storage.read_bytes(f"{memory_dir}/m.bin", max_bytes=5) == b"hello"


def fetch_error(location: str, **kwargs: Any) -> FetchError:
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


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="no /proc here")
def test_read_bytes_stays_bounded_where_the_reported_size_is_wrong():
    """A /proc file reports 0 bytes and holds more: the read still stops just past the limit."""
    assert os.stat("/proc/self/status").st_size == 0
    assert fetch_error("/proc/self/status", max_bytes=10).error_type == "file_too_large"
    assert storage.read_bytes("/proc/self/status", max_bytes=100_000).startswith(b"Name:")


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


# -- LocationPolicy ----------------------------------------------------------------------------


def location_error(policy: storage.LocationPolicy, location: str) -> FetchError:
    with pytest.raises(FetchError) as info:
        policy.check(location)
    assert info.value.error_type == "location_not_allowed"
    assert info.value.stage == Stage.FETCH
    return info.value


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    """A root folder with a file, a sibling folder sharing its name as prefix, and a secret outside."""
    root = tmp_path / "media"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(b"png")
    (tmp_path / "media-secret").mkdir()
    (tmp_path / "media-secret" / "x.png").write_bytes(b"secret")
    return root


@pytest.mark.parametrize("root_form", ["plain", "trailing_slash", "file_url", "dotted"])
@pytest.mark.parametrize(
    "relative, allowed",
    [
        ("media/img/a.png", True),
        ("media/img/missing.png", True),  # the policy judges the location, not whether it exists
        ("media", True),
        ("media/img/../img/a.png", True),
        ("media-secret/x.png", False),  # a sibling whose name starts with the root's: no raw prefix match
        ("media/../media-secret/x.png", False),
        ("media/img/../../media-secret/x.png", False),
        ("other.png", False),
    ],
)
def test_local_roots(tmp_path, media_root, root_form, relative, allowed):
    root = {
        "plain": str(media_root),
        "trailing_slash": str(media_root) + "/",
        "file_url": f"file://{media_root}",
        "dotted": str(media_root / "img" / ".."),
    }[root_form]
    policy = storage.LocationPolicy.from_roots([root])
    for location in (str(tmp_path) + "/" + relative, f"file://{tmp_path}/{relative}"):
        if allowed:
            policy.check(location)
        else:
            location_error(policy, location)


def test_relative_location_is_taken_from_the_working_folder(tmp_path, media_root, monkeypatch):
    policy = storage.LocationPolicy.from_roots([str(media_root)])
    monkeypatch.chdir(media_root)
    policy.check("img/a.png")
    location_error(policy, "../media-secret/x.png")


def test_symlink_out_of_a_root_is_refused(tmp_path, media_root):
    os.symlink(tmp_path / "media-secret", media_root / "link")
    os.symlink(tmp_path / "media-secret" / "x.png", media_root / "img" / "x.png")
    policy = storage.LocationPolicy.from_roots([str(media_root)])
    location_error(policy, str(media_root / "link" / "x.png"))
    location_error(policy, str(media_root / "img" / "x.png"))
    location_error(policy, f"file://{media_root}/link/x.png")


def test_root_reached_through_a_symlink_allows_its_files(tmp_path, media_root):
    os.symlink(media_root, tmp_path / "alias")
    policy = storage.LocationPolicy.from_roots([str(tmp_path / "alias")])
    assert policy.roots == (str(media_root),)  # realpath'ed once, on the launcher
    policy.check(str(media_root / "img" / "a.png"))
    policy.check(str(tmp_path / "alias" / "img" / "a.png"))
    location_error(policy, str(tmp_path / "media-secret" / "x.png"))


URL_CASES = [
    # (roots, location, allowed)
    (["https://"], "https://any.host/a/b.png", True),
    (["https://"], "HTTPS://any.host/a.png", True),  # schemes compare case-insensitively
    (["https://"], "http://any.host/a.png", False),
    (["https://"], "/local/a.png", False),
    (["gs://"], "gs://any-bucket/x.png", True),
    (["GS://"], "gs://any-bucket/x.png", True),
    (["gs://"], "s3://any-bucket/x.png", False),
    (["gs://bucket/img"], "gs://bucket/img/x.png", True),
    (["gs://bucket/img/"], "gs://bucket/img/sub/x.png", True),
    (["gs://bucket/img"], "gs://bucket/img2/x.png", False),  # sibling prefix
    (["gs://bucket/img"], "gs://bucket/other/x.png", False),
    (["gs://bucket/img"], "gs://bucket2/img/x.png", False),
    (["gs://bucket/img"], "s3://bucket/img/x.png", False),  # same path, other scheme
    (["gs://bucket/img"], "gs://bucket/img/../secret/x.png", False),
    (["gs://bucket/img"], "gs://bucket/img/sub/../x.png", True),
    (["gs://bucket/img"], "gs://bucket/./img/./x.png", True),
    (["gs://bucket/img"], "gs://bucket/img/../../other-bucket/img/x.png", False),
    (["gs://bucket/img/../img"], "gs://bucket/img/x.png", True),
    (["s3://b/p"], "s3://b/p/q.png", True),
    (["s3://b/p"], "s3://b/pq.png", False),
    (["s3://b/p", "/data/media"], "/data/media/x.png", True),
    (["s3://b/p", "/data/media"], "s3://b/p/x.png", True),
    (["s3://b/p", "/data/media"], "s3://b/x.png", False),
    # an fsspec chain reads through another file system than the one named
    (["https://"], "simplecache::https://host/a.png", False),
    (["https://host/a"], "simplecache::https://host/a/x.png", False),
    (["/data/media"], "simplecache::/data/media/x.png", False),
    (["gs://bucket/img"], "gs://bucket/img/x.png::s3://other/y", False),
    # the query and fragment are left out when matching (signed URLs)
    (["https://host/a"], "https://host/a/b.png?X-Goog-Signature=abc&X-Goog-Credential=k%2F2024%2Fauto", True),
    (["https://host/a"], "https://host/a/b.png#frag", True),
    (["https://host/a"], "https://host/b.png?next=/a/b.png", False),
    (["https://host/a"], "https://host/a/b.png?x=/../../secret", False),  # a ".." in the query: refused
    # percent-escaped or backslashed dot segments that a server may still read as ".."
    (["https://host/a"], "https://host/a/%2e%2e/secret.png", False),
    (["https://host/a"], "https://host/a/%2E%2E%2fsecret.png", False),
    (["https://host/a"], "https://host/a\\..\\secret.png", False),
    (["https://host/a"], "https://host/a/%20b.png", True),
    # the authority is compared as written: another host, port or user is another place
    (["https://host/a"], "https://host.evil.com/a/x.png", False),
    (["https://host/a"], "https://host@evil.com/a/x.png", False),
    (["https://host/a"], "https://host:8443/a/x.png", False),
    (["https://host"], "https://host/../evil.com/x.png", False),
    # not a URL fsspec could read
    (["https://"], "://host/a.png", False),
    (["https://"], "1http://host/a.png", False),
]


@pytest.mark.parametrize("roots, location, allowed", URL_CASES)
def test_url_roots(roots, location, allowed):
    policy = storage.LocationPolicy.from_roots(roots)
    if allowed:
        policy.check(location)
    else:
        location_error(policy, location)


@pytest.mark.parametrize(
    "location",
    ["/etc/passwd", "../x.png", "gs://any/x.png", "simplecache::https://h/a.png", "https://h/a?token=t"],
)
def test_empty_policy_allows_everything(location):
    storage.LocationPolicy().check(location)
    storage.LocationPolicy.from_roots([]).check(location)


@pytest.mark.parametrize(
    "location, secret",
    [
        ("https://user:hunter2@host/x.png", "hunter2"),
        ("https://host/x.png?token=s3cr3t", "s3cr3t"),
        ("https://host/x.png?X-Goog-Signature=deadbeef", "deadbeef"),
        ("simplecache::https://user:hunter2@host/x.png", "hunter2"),
        ("/data/other/x.png?token=s3cr3t", "s3cr3t"),
    ],
)
def test_refusal_message_is_redacted(location, secret):
    error = location_error(storage.LocationPolicy.from_roots(["gs://bucket"]), location)
    assert "--allowed_roots" in str(error)
    assert secret not in str(error)
    assert "x.png" in str(error)


@pytest.mark.parametrize("root", ["", "  ", "simplecache::gs://b", "gs://b/../../x", "htt ps://h"])
def test_unusable_root_is_a_configuration_error(root):
    with pytest.raises(ConfigurationError, match="allowed_roots") as info:
        storage.LocationPolicy.from_roots([root])
    assert "hunter2" not in str(info.value)


def test_unusable_root_message_is_redacted():
    with pytest.raises(ConfigurationError) as info:
        storage.LocationPolicy.from_roots(["simplecache::https://u:hunter2@host/a"])
    assert "hunter2" not in str(info.value)


def test_roots_normalised_once_and_policy_pickles(tmp_path):
    policy = storage.LocationPolicy.from_roots(
        ["HTTPS://", "gs://bucket/img/", "gs://bucket/./img", f"file://{tmp_path}", str(tmp_path) + "/"]
    )
    assert policy.roots == ("https://", "gs://bucket/img", os.path.realpath(tmp_path))
    copy = pickle.loads(pickle.dumps(policy))
    assert copy == policy
    copy.check("gs://bucket/img/x.png")
    location_error(copy, "gs://bucket/img2/x.png")


# -- input names -------------------------------------------------------------------------------


def _tree(base: str, names: list[str]) -> None:
    fs, root = fsspec.core.url_to_fs(base)
    for name in names:
        fs.makedirs(f"{root}/{name.rsplit('/', 1)[0]}", exist_ok=True)
        fs.pipe_file(f"{root}/{name}", b"{}\n")


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("{base}/data/x.parquet", ["x.parquet"]),
        ("{base}/data/", ["data"]),
        ("{base}/data/*.parquet", ["x.parquet", "y.parquet"]),
        ("{base}/{{train,val}}/*.jsonl", ["train/a.jsonl", "val/a.jsonl"]),
        ("{base}/shards/part-{{0..1}}.tar", ["part-0.tar", "part-1.tar"]),
    ],
)
def test_inputs_are_named_under_their_patterns_fixed_folder_wherever_the_data_lies(
    pattern: str, names: list[str], tmp_path: Path, memory_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The names derived ids start with: the same for the data on a laptop, relative to the
    working folder, or in a bucket, and distinct for train/a.jsonl and val/a.jsonl."""
    files = [
        "data/x.parquet",
        "data/y.parquet",
        "train/a.jsonl",
        "val/a.jsonl",
        "shards/part-0.tar",
        "shards/part-1.tar",
    ]
    for base in (str(tmp_path), memory_dir):
        _tree(base, files)
    monkeypatch.chdir(tmp_path)
    for base in (str(tmp_path), ".", memory_dir):
        given = pattern.format(base=base)
        root = storage.pattern_root(given)
        assert [storage.name_under(path, root) for path in storage.expand_inputs([given])] == names, base


def test_a_glob_the_shell_expanded_names_its_files_as_the_glob_does(tmp_path: Path) -> None:
    """``--input */data.parquet`` unquoted is two arguments; their files must not both be named
    "data.parquet", or every derived id of one would be a duplicate of the other's."""
    from mmfeatures.sources import find_inputs

    _tree(str(tmp_path), ["a/data.parquet", "b/data.parquet"])
    quoted = [found.name for found in find_inputs([str(tmp_path / "*" / "data.parquet")])]
    expanded = [
        found.name
        for found in find_inputs([str(tmp_path / "a" / "data.parquet"), str(tmp_path / "b" / "data.parquet")])
    ]
    assert quoted == expanded == ["a/data.parquet", "b/data.parquet"]
