"""Property-based fuzz tests: manifest parsing, tar shards, record validation, the three decoders
and the preprocessing after them, on arbitrary and on mutated valid inputs. No exception may escape
except the documented ones (``mmfeatures.errors``): manifest readers yield ``ErrorRow``s for what
they cannot read, ``parse_record`` raises ``ValidationError``, decoders raise ``DecodeError`` and
``preprocess`` raises ``PreprocessError`` (or ``DecodeError``).

CI runs the "ci" settings profile (a few hundred examples per test, thousands in all, about half
a minute). The longer fuzz run, outside CI (50,000 examples per test, scaled as in CI; about
40 minutes on one core):

    MMFEATURES_FUZZ=long .venv/bin/python -m pytest tests/test_fuzz.py

Add ``--hypothesis-show-statistics`` for the per-test counts. A failing example is saved in
``.hypothesis/`` and replayed first by the next run; keep it as an ``@example`` once fixed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mmfeatures.errors import DecodeError, ErrorRow, PreprocessError, RecordError, Stage, ValidationError
from mmfeatures.modalities.audio import AudioPreprocessor, decode_audio
from mmfeatures.modalities.base import Preprocessor, Window
from mmfeatures.modalities.image import ImagePreprocessor, _exif_orientation, check_header_pixels, decode_image
from mmfeatures.modalities.text import TextPreprocessor, normalize_text
from mmfeatures.records import MODALITY_COLUMNS, TAR_COLUMNS, Record, parse_record, reported_id
from mmfeatures.schema import field_names
from mmfeatures.sources import Input, ManifestRow, ReadOptions, declared_column_types, manifest_format, read_manifest
from tests.tar_shards import Member, build_tar

# -- settings profiles ---------------------------------------------------------------------------
# Applied with a decorator rather than ``settings.load_profile`` so that the other test modules
# keep Hypothesis' defaults.
settings.register_profile(
    "ci",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("long", settings.get_profile("ci"), max_examples=50_000)
FUZZ = settings.get_profile(os.environ.get("MMFEATURES_FUZZ", "ci"))


def fuzz(scale: float = 1.0) -> settings:
    """The chosen profile, with ``scale`` times its examples (fast decoders run more, the tests
    that also preprocess fewer)."""
    return settings(FUZZ, max_examples=max(int(FUZZ.max_examples * scale), 1))


# -- mutation of valid files ---------------------------------------------------------------------
@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """One of ``seeds`` with 1-6 edits (bit flips, byte overwrites, truncation, insertions,
    deletions, duplicated spans), aimed at the header and the end of the file as often as at
    the middle: that is where lengths, sizes and offsets live."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        size = len(data)
        where = draw(st.sampled_from(["head", "tail", "any"]))
        if where == "head":
            position = draw(st.integers(0, min(size, 64)))
        elif where == "tail":
            position = draw(st.integers(max(size - 64, 0), size))
        else:
            position = draw(st.integers(0, size))
        operation = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate"]))
        if operation in ("flip", "set") and position < size:
            if operation == "flip":
                data[position] ^= 1 << draw(st.integers(0, 7))
            else:
                data[position] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]) | st.integers(0, 255))
        elif operation == "truncate":
            del data[position:]
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        elif operation == "duplicate":
            data[position:position] = data[position : position + draw(st.integers(1, 32))]
    return bytes(data)


# -- manifests -------------------------------------------------------------------------------------
RECORD_COLUMNS = field_names("record")
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(exclude_categories=()))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=10,
)
column_names = st.sampled_from(RECORD_COLUMNS) | st.text(max_size=10)
manifest_rows = st.dictionaries(column_names, json_values, max_size=8)


def _json_line(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


jsonl_lines = st.one_of(
    st.binary(max_size=200),
    manifest_rows.map(_json_line),
    json_values.map(_json_line),
    st.text(max_size=100).map(lambda text: text.encode("utf-8")),
)
jsonl_bytes = st.binary(max_size=2000) | st.lists(jsonl_lines, max_size=12).map(b"\n".join)
csv_cells = st.text(st.sampled_from(',"\r\n\x00 ab\u00e9\ufeff'), max_size=12) | st.text(max_size=12)
csv_bytes = st.binary(max_size=2000) | st.lists(st.lists(csv_cells, max_size=6), max_size=10).map(
    lambda rows: "\n".join(",".join(cells) for cells in rows).encode("utf-8", "surrogatepass")
)


def _parquet_seeds() -> list[bytes]:
    rows = [
        {"id": "a", "text": "hello", "image": None, "audio": None, "label": 3, "split": "train", "score": 0.5},
        {"id": "b", "text": None, "image": "x.png", "audio": "y.wav", "label": None, "split": None, "score": None},
        {"id": "c", "text": "é" * 40, "image": "", "audio": None, "label": 7, "split": "val", "score": float("nan")},
    ]
    table = pa.Table.from_pylist(rows)
    table = table.append_column("tags", pa.array([["x"], [], None], pa.list_(pa.string())))
    table = table.append_column("when", pa.array([0, 10**15, None], pa.timestamp("us", tz="UTC")))
    table = table.append_column("meta", pa.array([{"k": 1}, None, {"k": 2}], pa.struct([("k", pa.int32())])))
    seeds = []
    for options in (
        {"compression": "none"},
        {"compression": "snappy", "row_group_size": 1},
        {"compression": "zstd", "use_dictionary": False, "data_page_version": "2.0"},
        {"compression": "gzip", "write_statistics": False},
    ):
        buffer = io.BytesIO()
        pq.write_table(table, buffer, **options)
        seeds.append(buffer.getvalue())
    return seeds


def _parquet_bytes(table: pa.Table, **options) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    return buffer.getvalue()


PARQUET_SEEDS = _parquet_seeds()
# Valid files whose second row holds a value Python cannot represent: a timestamp past year 9999
# (OverflowError in to_pylist), a string column holding bytes that are not UTF-8 (UnicodeDecodeError).
_NOT_UTF8 = pa.Array.from_buffers(
    pa.string(), 3, [None, pa.py_buffer(struct.pack("<4i", 0, 1, 3, 4)), pa.py_buffer(b"a\xff\xfec")]
)
# A column name that is not UTF-8: pyarrow raises UnicodeDecodeError while opening the file.
NON_UTF8_COLUMN_PARQUET = _parquet_bytes(pa.table({"id": ["a"], "zzzz": ["b"]}), store_schema=False).replace(
    b"zzzz", b"\xf4zzz"
)
PARQUET_ODD_SEEDS = [
    _parquet_bytes(
        pa.table({"id": ["a", "b", "c"], "text": ["t"] * 3, "t": pa.array([0, 10**15, 1], pa.timestamp("s"))})
    ),
    _parquet_bytes(pa.table({"id": ["a", "b", "c"], "text": _NOT_UTF8})),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _check_manifest(path: str) -> list[ManifestRow | ErrorRow]:
    """Read a manifest the way the job does; every item must be a row or an error row."""
    declared = declared_column_types(Input(path, manifest_format(path)))
    assert declared is None or isinstance(declared, dict)
    items = list(read_manifest(path))
    for item in items:
        if isinstance(item, ManifestRow):
            assert isinstance(item.data, dict)
            assert item.source.startswith(f"{path}:")
        else:
            assert isinstance(item, ErrorRow), item
            assert item.stage == Stage.READ and item.modality is None
            assert item.id is None or (isinstance(item.id, str) and item.id.strip())  # a record's, when it has one
            assert item.error_type and isinstance(item.message, str)
            assert item.source is not None and item.source.startswith(path)
    return items


def _write(workdir: Path, name: str, data: bytes) -> str:
    path = workdir / name
    path.write_bytes(data)
    return str(path)


@fuzz()
@given(data=jsonl_bytes)
@example(data=b"[" * 100_000)  # RecursionError in json.loads
@example(data=b'{"id": ' + b"1" * 5000 + b', "text": "t"}')  # int over Python's 4300-digit limit
@example(data=b'\xef\xbb\xbf{"id": "a"}\n\xef\xbb\xbf{"id": "b"}')
def test_jsonl_manifest_of_any_bytes(workdir: Path, data: bytes) -> None:
    _check_manifest(_write(workdir, "m.jsonl", data))


@fuzz()
@given(data=csv_bytes)
@example(data=b"id,text\n" + b"x" * 200_000 + b",y\nb,t\n")  # a field over csv's 128 KiB limit
@example(data=b"x" * 200_000 + b",text\nb,t\n")  # ... in the header
@example(data=b'id,text\n"a\n' + b"x" * 200_000 + b'",y\nb,t\n')  # ... in a quoted multi-line field
def test_csv_manifest_of_any_bytes(workdir: Path, data: bytes) -> None:
    _check_manifest(_write(workdir, "m.csv", data))


def test_csv_field_over_the_limit_is_that_rows_error(workdir: Path) -> None:
    path = _write(workdir, "long.csv", b"id,text\na," + b"x" * 200_000 + b"\nb,t\n")
    items = _check_manifest(path)
    assert [(getattr(item, "error_type", None), item.source) for item in items] == [
        ("malformed_csv", f"{path}:2"),
        (None, f"{path}:3"),
    ]


@fuzz()
@given(data=mutated(PARQUET_SEEDS + PARQUET_ODD_SEEDS))
@example(data=b"")  # pyarrow: ArrowInvalid, file smaller than the footer
@example(data=b"PAR1")
@example(data=PARQUET_SEEDS[0][: len(PARQUET_SEEDS[0]) // 2])
@example(data=NON_UTF8_COLUMN_PARQUET)
def test_parquet_manifest_of_mutated_bytes(workdir: Path, data: bytes) -> None:
    items = _check_manifest(_write(workdir, "m.parquet", data))
    unreadable = [i for i, item in enumerate(items) if getattr(item, "error_type", None) == "unreadable_manifest"]
    assert unreadable in ([], [len(items) - 1])  # the read stops at an unreadable part, with one error row
    for item in items[: len(items) - len(unreadable)]:
        assert isinstance(item, ManifestRow) or item.error_type == "malformed_row"


@pytest.mark.parametrize("seed", range(len(PARQUET_SEEDS)))
def test_parquet_seeds_read_whole(workdir: Path, seed: int) -> None:
    items = _check_manifest(_write(workdir, "seed.parquet", PARQUET_SEEDS[seed]))
    rows = [item for item in items if isinstance(item, ManifestRow)]
    assert rows == items  # no error rows
    assert [row.data["id"] for row in rows] == ["a", "b", "c"]


@pytest.mark.parametrize("seed", range(len(PARQUET_ODD_SEEDS)))
def test_parquet_value_python_cannot_hold_is_that_rows_error(workdir: Path, seed: int) -> None:
    path = _write(workdir, "odd.parquet", PARQUET_ODD_SEEDS[seed])
    items = _check_manifest(path)
    assert [type(item).__name__ for item in items] == ["ManifestRow", "ErrorRow", "ManifestRow"]
    assert isinstance(items[0], ManifestRow) and isinstance(items[1], ErrorRow) and isinstance(items[2], ManifestRow)
    assert (items[1].error_type, items[1].source) == ("malformed_row", f"{path}:2")
    assert [items[0].data["id"], items[2].data["id"]] == ["a", "c"]


def _check_record(row: dict, source: str, rejected: Mapping[str, RecordError] | None = None) -> None:
    try:
        record = parse_record(row, source=source, manifest_dir="/m", rejected=rejected)
    except ValidationError as exc:
        assert exc.error_type and exc.stage == Stage.VALIDATE
        rid = reported_id(row)
        assert rid is None or (isinstance(rid, str) and rid.strip())
        error = ErrorRow.from_exception(exc, record_id=rid, modality=None, source=source)
        pa.Table.from_pylist([error.to_dict()])  # the error row can always be written
        return
    assert isinstance(record, Record)
    assert isinstance(record.id, str) and record.id.strip()
    assert record.modalities() or record.rejected  # a record whose every modality failed is kept
    assert set(record.payloads) <= set(MODALITY_COLUMNS)
    assert all(isinstance(value, (str, bytes)) for value in record.payloads.values())
    assert all(row.id == record.id and row.modality in MODALITY_COLUMNS for row in record.rejected)
    assert record.label is None or isinstance(record.label, str)
    assert record.split is None or isinstance(record.split, str)
    pa.array([record.id, record.label, record.split])  # what the feature table holds can be written
    json.dumps(dict(record.carried), default=str).encode("utf-8")


@fuzz()
@given(row=manifest_rows)
@example(row={"id": 10**300, "text": "t", "label": 1e300})
@example(row={"id": "a", "text": "t", "label": float("inf")})
@example(row={"id": "a", "audio": " ", "text": float("nan")})
def test_parse_record_raises_only_validation_errors(row: dict) -> None:
    _check_record(row, "m.jsonl:1")


@fuzz(1 / 2)
@given(rows=st.lists(manifest_rows, max_size=6), as_csv=st.booleans())
def test_generated_manifests_read_and_validate(workdir: Path, rows: list[dict], as_csv: bool) -> None:
    """Generated rows written as JSONL (any JSON values) or CSV (their text), read, then validated."""
    if as_csv:
        columns = sorted({key for row in rows for key in row})
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(column, "") for column in columns])
        path = _write(workdir, "g.csv", buffer.getvalue().encode("utf-8", "surrogatepass"))
    else:
        path = _write(workdir, "g.jsonl", b"\n".join(_json_line(row) for row in rows))
    for item in _check_manifest(path):
        if isinstance(item, ManifestRow):
            _check_record(item.data, item.source)


# -- tar shards ------------------------------------------------------------------------------------
TAR_ERROR_TYPES = {
    "unsafe_tar_member",
    "unsupported_member",
    "conflicting_member",
    "malformed_json",
    "invalid_utf8",
    "file_too_large",
    "unreadable_manifest",
}
HOSTILE_NAMES = ["../x.txt", "/etc/x.txt", "a/../../x.txt", "..\\x.txt", "C:/x.txt", "..", "a/.."]
member_names = st.one_of(
    st.builds(
        "{}{}.{}".format,
        st.sampled_from(["", "a/", "a/b.c/"]),
        st.sampled_from(["0", "1", "k.v"]),
        st.sampled_from(sorted(TAR_COLUMNS) + ["json", "npy", "JPG", ""]),
    ),
    st.sampled_from(HOSTILE_NAMES),
    # Any bytes but NUL, as tarfile reads them: not UTF-8 becomes lone surrogates.
    st.binary(max_size=20).map(lambda raw: raw.replace(b"\x00", b"").decode("utf-8", "surrogateescape")),
)
member_data = st.binary(max_size=64) | json_values.map(_json_line) | manifest_rows.map(_json_line)
tar_members = st.lists(
    st.builds(
        Member,
        name=member_names,
        data=member_data,
        type=st.sampled_from(
            [tarfile.REGTYPE] * 6
            + [
                tarfile.DIRTYPE,
                tarfile.SYMTYPE,
                tarfile.LNKTYPE,
                tarfile.CHRTYPE,
                tarfile.BLKTYPE,
                tarfile.FIFOTYPE,
            ]
        ),
        linkname=st.sampled_from(["", "/etc/passwd", "../x"]),
    ),
    max_size=12,
)
TAR_SEEDS = [
    build_tar([Member("a/0.txt", b"words"), Member("a/0.json", b'{"label": 1}'), Member("a/1.png", b"\x89PNG")], c)
    for c in ("", "gz")
]


def _check_tar(path: str, max_member_bytes: int | None) -> None:
    """Read a shard the way the job does: rows and error rows of the documented types only, no
    row from a member whose name could escape a folder, and rows that validate."""
    for item in read_manifest(path, ReadOptions(max_member_bytes=max_member_bytes)):
        assert item.source is not None and item.source.startswith(path)
        if isinstance(item, ErrorRow):
            assert item.stage == Stage.READ and item.modality is None
            assert item.error_type in TAR_ERROR_TYPES, item
            continue
        assert isinstance(item, ManifestRow), item
        parts = item.data["id"].replace("\\", "/").split("/")
        assert ".." not in parts and not item.data["id"].startswith(("/", "\\")), item.data["id"]
        _check_record(item.data, item.source, item.rejected)


@fuzz()
@given(
    members=tar_members,
    compression=st.sampled_from(["", "gz"]),
    cut=st.none() | st.integers(0, 4000),
    max_member_bytes=st.none() | st.integers(0, 80),
)
@example(members=[Member(name, b"x") for name in HOSTILE_NAMES], compression="", cut=None, max_member_bytes=None)
def test_tar_shard_of_generated_members(
    workdir: Path, members: list[Member], compression: Literal["", "gz"], cut: int | None, max_member_bytes: int | None
) -> None:
    """Any member names, types and contents, compressed or not, whole or cut short."""
    data = build_tar(members, compression)
    _check_tar(_write(workdir, "g.tar.gz" if compression else "g.tar", data[:cut]), max_member_bytes)


@fuzz()
@given(data=mutated(TAR_SEEDS))
@example(data=b"\x1f\x8b\x08")  # a gzip header cut short: TypeError inside tarfile
def test_tar_shard_of_mutated_bytes(workdir: Path, data: bytes) -> None:
    _check_tar(_write(workdir, "m.tar", data), 4)


# -- images ----------------------------------------------------------------------------------------
def _image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = bgr[:, :, 0].copy()
    bgra = np.dstack([bgr, rng.integers(0, 256, (5, 7), dtype=np.uint8)])
    grey16 = grey.astype(np.uint16) * 257
    bgra16 = bgra.astype(np.uint16) * 257
    exif = b"II*\x00" + struct.pack("<IHHHIHHI", 8, 1, 0x0112, 3, 1, 6, 0, 0)
    encodings: list[tuple[str, np.ndarray, list[int]]] = [
        (".png", grey, []),
        (".png", bgr, []),
        (".png", bgra, []),
        (".png", grey16, []),
        (".png", bgra16, []),
        (".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90]),
        (".jpg", grey, []),
        (".jpg", bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        (".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, 80]),
        (".webp", bgra, [cv2.IMWRITE_WEBP_QUALITY, 101]),
        (".bmp", bgr, []),
        (".bmp", grey, []),
        (".bmp", bgra, []),
        (".tiff", bgr, []),
        (".tiff", bgra, []),
        (".tiff", grey16, []),
        (".tiff", bgr.astype(np.float32) / 255, []),
    ]
    seeds = []
    for ext, image, params in encodings:
        ok, buffer = cv2.imencode(ext, image, params)
        assert ok, ext
        seeds.append(buffer.tobytes())
    for ext in (".jpg", ".png", ".webp"):
        ok, buffer = cv2.imencodeWithMetadata(ext, bgr, [cv2.IMAGE_METADATA_EXIF], [np.frombuffer(exif, np.uint8)])
        assert ok, ext
        seeds.append(buffer.tobytes())
    return seeds


IMAGE_SEEDS = _image_seeds()


def _check_image(data: bytes) -> np.ndarray | None:
    try:
        image = decode_image(data)
    except DecodeError as exc:
        assert exc.error_type and exc.stage == Stage.DECODE
        return None
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 0 and image.shape[1] > 0
    return image


@pytest.mark.parametrize("seed", range(len(IMAGE_SEEDS)))
def test_image_seeds_decode(seed: int) -> None:
    assert _check_image(IMAGE_SEEDS[seed]) is not None


@fuzz(2)
@given(data=st.binary(max_size=512))
@example(data=b"\x89PNG\r\n\x1a\n")
@example(data=b"RIFF\x00\x00\x00\x00WEBPVP8X")
def test_decode_image_of_any_bytes(data: bytes) -> None:
    _check_image(data)


@fuzz(2)
@given(data=mutated(IMAGE_SEEDS))
def test_decode_image_of_mutated_files(data: bytes) -> None:
    _check_image(data)


@fuzz(2)
@given(data=mutated(IMAGE_SEEDS), max_pixels=st.integers(1, 100))
def test_header_probe_of_mutated_files(data: bytes, max_pixels: int) -> None:
    """The header probe on broken files: a size over the limit, a header that cannot be read,
    bytes in no format whose size it reads, or no bytes; nothing else escapes (the seeds are 35 pixels, so
    every verdict occurs)."""
    try:
        check_header_pixels(data, max_pixels)
    except DecodeError as exc:
        assert exc.error_type in ("image_too_large", "unreadable_image_header", "corrupt_image", "empty_file")
        assert exc.stage == Stage.DECODE


@fuzz(2)
@given(block=st.binary(max_size=64), order=st.sampled_from([b"II*\x00", b"MM\x00*", b"Exif\x00\x00II*\x00", b""]))
def test_exif_orientation_of_any_block(block: bytes, order: bytes) -> None:
    assert isinstance(_exif_orientation(order + block), int)


@pytest.fixture(scope="module")
def image_preprocessor() -> ImagePreprocessor:
    return ImagePreprocessor()


def _check_windows(preprocessor: Preprocessor, payload: bytes | str, check: Callable[[Window], None]) -> None:
    """``payload`` through ``decode`` then ``preprocess``: windows, or a documented error."""
    try:
        windows = preprocessor.preprocess(preprocessor.decode(payload))
    except (DecodeError, PreprocessError) as exc:
        assert exc.error_type and exc.stage in (Stage.DECODE, Stage.PREPROCESS)
        return
    assert isinstance(windows, list) and windows
    for window in windows:
        check(window)


@fuzz(1 / 3)
@given(data=mutated(IMAGE_SEEDS))
def test_image_preprocess_of_mutated_files(image_preprocessor: ImagePreprocessor, data: bytes) -> None:
    def check(window):
        pixels = window["pixel_values"]
        assert pixels.dtype == np.float32 and pixels.shape == (3, 224, 224) and np.isfinite(pixels).all()

    _check_windows(image_preprocessor, data, check)


# -- audio -----------------------------------------------------------------------------------------
def _audio_seeds() -> list[bytes]:
    t = np.arange(800) / 8000
    mono = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo = np.stack([mono, 0.5 * mono], axis=1)  # not anti-phase: that down-mixes to silence
    seeds = []
    for samples, rate, fmt, subtype in (
        (mono, 8000, "WAV", "PCM_16"),
        (stereo, 8000, "WAV", "FLOAT"),
        (mono, 8000, "WAV", "PCM_U8"),
        (mono, 8000, "WAV", "ULAW"),
        (stereo, 16000, "WAV", "PCM_24"),
        (mono, 8000, "WAV", "DOUBLE"),
        (mono, 8000, "FLAC", "PCM_16"),
        (stereo, 8000, "FLAC", "PCM_24"),
        (mono, 8000, "OGG", "VORBIS"),
        (mono, 8000, "OGG", "OPUS"),
        (mono, 8000, "MP3", "MPEG_LAYER_III"),
    ):
        buffer = io.BytesIO()
        soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
        seeds.append(buffer.getvalue())
    return seeds


AUDIO_SEEDS = _audio_seeds()


def _mp3_claiming_frames(count: int) -> bytes:
    """The MP3 seed with its Xing header's frame count set to ``count`` (576 samples each)."""
    data = bytearray(AUDIO_SEEDS[-1])
    at = data.index(b"Xing") + 8  # after the tag and its flags (frames, bytes, TOC, quality)
    data[at : at + 4] = struct.pack(">I", count)
    return bytes(data)


def _check_audio(data: bytes) -> None:
    try:
        waveform, rate = decode_audio(data)
    except DecodeError as exc:
        assert exc.error_type and exc.stage == Stage.DECODE
        return
    assert isinstance(waveform, np.ndarray) and waveform.dtype == np.float32 and waveform.ndim == 1
    assert len(waveform) > 0 and np.isfinite(waveform).all()
    assert isinstance(rate, int) and rate > 0


@pytest.mark.parametrize("seed", range(len(AUDIO_SEEDS)))
def test_audio_seeds_decode(seed: int) -> None:
    waveform, rate = decode_audio(AUDIO_SEEDS[seed])
    assert len(waveform) > 0 and rate > 0


@fuzz(2)
@given(data=st.binary(max_size=512))
@example(data=b"RIFF")
@example(data=b"fLaC")
@example(data=b"OggS")
def test_decode_audio_of_any_bytes(data: bytes) -> None:
    _check_audio(data)


@fuzz(2)
@given(data=mutated(AUDIO_SEEDS))
@example(data=_mp3_claiming_frames(0xFFFFFFFF))  # soundfile allocates 9 TiB: MemoryError
def test_decode_audio_of_mutated_files(data: bytes) -> None:
    _check_audio(data)


@pytest.fixture(scope="module")
def audio_preprocessor() -> AudioPreprocessor:
    return AudioPreprocessor()


def _float_wav(amplitude: float) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.full(800, amplitude, np.float32), 8000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


@fuzz(1 / 3)
@given(data=mutated(AUDIO_SEEDS))
@example(data=_float_wav(1e20))  # finite samples, but NaN log-mel features
def test_audio_preprocess_of_mutated_files(audio_preprocessor: AudioPreprocessor, data: bytes) -> None:
    def check(window):
        features = window["input_features"]
        assert features.dtype == np.float32 and features.ndim == 2 and features.shape[1] > 0
        assert np.isfinite(features).all()

    _check_windows(audio_preprocessor, data, check)


# -- text ------------------------------------------------------------------------------------------
any_text = st.text(st.characters(exclude_categories=())) | st.text(
    st.sampled_from(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000\u200b\ufeff\x00a\u0301\ufdfa\u2460\ufb01")
)


@pytest.fixture(scope="module")
def text_preprocessor() -> TextPreprocessor:
    return TextPreprocessor()


@fuzz(2)
@given(payload=any_text | st.binary(max_size=256) | any_text.map(lambda text: text.encode("utf-8", "surrogatepass")))
@example(payload="a\ud800b")  # a lone surrogate, as json.loads gives for "\ud800"
@example(payload=b"a\xed\xa0\x80b")
@example(payload=" \u3000\n ")
def test_text_decode(text_preprocessor: TextPreprocessor, payload: str | bytes) -> None:
    try:
        text = text_preprocessor.decode(payload)
    except DecodeError as exc:
        assert exc.error_type and exc.stage == Stage.DECODE
        return
    assert isinstance(text, str) and text and text == text.strip()
    assert normalize_text(text) == text
    text.encode("utf-8")  # the tokenizer and the Parquet writers need valid Unicode


@fuzz(1 / 3)
@given(payload=any_text | st.binary(max_size=256))
@example(payload="a\ud800b")
@example(payload="word " * 600)  # several windows
def test_text_preprocess(text_preprocessor: TextPreprocessor, payload: str | bytes) -> None:
    def check(window):
        ids = window["input_ids"]
        assert ids.dtype == np.int64 and ids.ndim == 1 and 0 < len(ids) <= text_preprocessor.window

    _check_windows(text_preprocessor, payload, check)
