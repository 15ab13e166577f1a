"""Image modality: decoding every format with OpenCV, colour handling (grey, alpha, 16-bit, EXIF
orientation), decode errors, the pixel cap (checked on the header before decoding), resize-and-crop
geometry, and embeddings from the default MobileNetV2
and a tiny random ViT loaded from a ``save_pretrained`` folder."""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from mmfeatures.errors import DecodeError, Stage
from mmfeatures.limits import Limits
from mmfeatures.modalities import image as image_module
from mmfeatures.modalities.image import (
    IMAGE,
    ImageEncoder,
    ImagePreprocessor,
    MobileNetV2Encoder,
    decode_image,
    normalize,
    resize_and_crop,
)
from tests.conftest import forward, prepare

RED_RGB = (255, 0, 0)
BLUE_RGB = (0, 0, 255)


def encode(image: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buffer = cv2.imencode(ext, image, params or [])
    assert ok
    return buffer.tobytes()


def red_left_blue_right(height: int = 24, width: int = 40) -> np.ndarray:
    """A BGR image, left half red and right half blue, so both colour order and rotation show."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = RED_RGB[::-1]
    image[:, width // 2 :] = BLUE_RGB[::-1]
    return image


def with_exif_orientation(
    image: np.ndarray, orientation: int, ext: str = ".jpg", params: list[int] | None = None
) -> bytes:
    """An ``ext`` file whose EXIF block holds one tag: Orientation (0x0112, SHORT) = ``orientation``
    (a JPEG APP1 segment, a PNG eXIf chunk, a WebP EXIF chunk)."""
    tiff = (
        b"II*\x00"
        + struct.pack("<I", 8)  # offset of IFD0
        + struct.pack("<H", 1)  # one entry
        + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
        + struct.pack("<I", 0)  # no next IFD
    )
    if params is None:
        params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == ".jpg" else []
    exif = [np.frombuffer(tiff, np.uint8)]
    ok, buffer = cv2.imencodeWithMetadata(ext, image, [cv2.IMAGE_METADATA_EXIF], exif, params)
    assert ok
    data = buffer.tobytes()
    assert tiff in data
    return data


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def with_bad_crc(chunk: bytes) -> bytes:
    return chunk[:-4] + bytes(byte ^ 0xFF for byte in chunk[-4:])


def patched(data: bytes, marker: bytes, offset: int, replacement: bytes) -> bytes:
    """``data`` with ``replacement`` written ``offset`` bytes after the start of the first ``marker``."""
    at = data.index(marker) + offset
    return data[:at] + replacement + data[at + len(replacement) :]


def grey_alpha_png(grey: np.ndarray, alpha: np.ndarray) -> bytes:
    """An 8-bit grey + alpha PNG (colour type 4), which ``cv2.imencode`` cannot write."""
    height, width = grey.shape
    rows = np.dstack([grey, alpha]).reshape(height, width * 2)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 8, 4, 0, 0, 0)
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def tiff_with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    """An uncompressed RGB or RGBA (unassociated alpha) TIFF with an Orientation tag, which OpenCV's
    TIFF writer does not write."""
    height, width, channels = rgb.shape
    pixels = rgb.tobytes() + b"\x00" * (rgb.nbytes % 2)  # the IFD must start on a word boundary
    bits_offset = 8 + len(pixels)
    ifd_offset = bits_offset + 2 * channels
    short, long_ = 3, 4  # field types
    entries = [
        (256, long_, 1, width),
        (257, long_, 1, height),
        (258, short, channels, bits_offset),  # BitsPerSample: 8 for each sample, stored at bits_offset
        (259, short, 1, 1),  # no compression
        (262, short, 1, 2),  # RGB
        (273, long_, 1, 8),  # the strip starts right after the header
        (274, short, 1, orientation),
        (277, short, 1, channels),
        (278, long_, 1, height),
        (279, long_, 1, rgb.nbytes),
    ] + ([(338, short, 1, 2)] if channels == 4 else [])  # ExtraSamples: unassociated alpha
    # Little-endian, so a one-SHORT value left-justified in its 4-byte field packs like a LONG.
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *entry) for entry in entries)
    bits = struct.pack(f"<{channels}H", *[8] * channels)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + pixels + bits + ifd + b"\x00" * 4  # no next IFD


def assert_rotated_clockwise(decoded: np.ndarray, height: int = 24, width: int = 40, atol: float = 10) -> None:
    """``red_left_blue_right(height, width)`` turned 90 degrees clockwise: red on top, blue below."""
    assert decoded.shape == (width, height, 3) and decoded.dtype == np.uint8
    np.testing.assert_allclose(decoded[: width // 2 - 5].reshape(-1, 3).mean(0), RED_RGB, atol=atol)
    np.testing.assert_allclose(decoded[-(width // 2 - 5) :].reshape(-1, 3).mean(0), BLUE_RGB, atol=atol)


# -- decoding ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ext", "params", "tolerance"),
    [
        (".png", None, 0),
        (".bmp", None, 0),
        (".tiff", None, 0),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], 0),  # lossless
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80], 40),
        (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95], 40),
    ],
)
def test_formats_decode_to_rgb_uint8(ext: str, params: list[int] | None, tolerance: int) -> None:
    decoded = decode_image(encode(red_left_blue_right(), ext, params))
    assert decoded.shape == (24, 40, 3)
    assert decoded.dtype == np.uint8
    # Away from the edge between the halves (where lossy codecs bleed), colours are RGB.
    np.testing.assert_allclose(decoded[:, :12].reshape(-1, 3).mean(0), RED_RGB, atol=tolerance / 4)
    np.testing.assert_allclose(decoded[:, -12:].reshape(-1, 3).mean(0), BLUE_RGB, atol=tolerance / 4)
    if tolerance == 0:
        assert (decoded[:, :20] == RED_RGB).all() and (decoded[:, 20:] == BLUE_RGB).all()


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff", ".webp"])
def test_grey_images_become_three_equal_channels(ext: str) -> None:
    grey = np.tile(np.arange(0, 200, 10, dtype=np.uint8), (8, 1))
    decoded = decode_image(encode(grey, ext))
    assert decoded.shape == (8, 20, 3)
    assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 1] == decoded[..., 2]).all()
    np.testing.assert_allclose(decoded[..., 0].astype(int), grey.astype(int), atol=12)


@pytest.mark.parametrize("ext", [".png", ".webp", ".tiff"])
def test_alpha_is_composited_onto_white(ext: str) -> None:
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[0, 0] = (0, 0, 255, 0)  # red, fully transparent
    bgra[0, 1] = (0, 0, 255, 255)  # red, opaque
    bgra[0, 2] = (255, 0, 0, 128)  # blue, half transparent
    bgra[1:] = (10, 20, 30, 255)
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else None
    decoded = decode_image(encode(bgra, ext, params))
    assert decoded.shape == (4, 4, 3)
    assert tuple(decoded[0, 0]) == (255, 255, 255)
    assert tuple(decoded[0, 1]) == (255, 0, 0)
    np.testing.assert_allclose(decoded[0, 2].astype(int), (127, 127, 255), atol=1)
    assert tuple(decoded[1, 1]) == (30, 20, 10)


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_16_bit_images_are_scaled_to_8_bit(ext: str) -> None:
    colour = np.zeros((3, 5, 3), np.uint16)
    colour[0] = (0, 0, 65535)  # BGR red
    colour[1] = (32896, 32896, 32896)  # 128 * 257
    colour[2] = (257, 514, 771)
    decoded = decode_image(encode(colour, ext))
    assert decoded.dtype == np.uint8
    assert tuple(decoded[0, 0]) == (255, 0, 0)
    assert tuple(decoded[1, 0]) == (128, 128, 128)
    assert tuple(decoded[2, 0]) == (3, 2, 1)

    grey = decode_image(encode(np.full((2, 2), 65535, np.uint16), ext))
    assert grey.shape == (2, 2, 3) and (grey == 255).all()


def test_jpeg_exif_orientation_is_applied() -> None:
    image = red_left_blue_right(24, 40)
    assert decode_image(with_exif_orientation(image, 1)).shape == (24, 40, 3)

    rotated = decode_image(with_exif_orientation(image, 6))  # 6: rotate 90 degrees clockwise
    assert rotated.shape == (40, 24, 3)
    # Rotated clockwise, the left (red) half ends on top and the right (blue) half at the bottom.
    np.testing.assert_allclose(rotated[:15].reshape(-1, 3).mean(0), RED_RGB, atol=10)
    np.testing.assert_allclose(rotated[-15:].reshape(-1, 3).mean(0), BLUE_RGB, atol=10)

    flipped = decode_image(with_exif_orientation(image, 3))  # 3: rotate 180 degrees
    assert flipped.shape == (24, 40, 3)
    np.testing.assert_allclose(flipped[:, :15].reshape(-1, 3).mean(0), BLUE_RGB, atol=10)


@pytest.mark.parametrize(
    ("ext", "params", "atol"),
    [(".png", None, 0), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], 0), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80], 10)],
)
def test_png_and_webp_exif_orientation_is_applied(ext: str, params: list[int] | None, atol: float) -> None:
    image = red_left_blue_right(24, 40)
    assert decode_image(with_exif_orientation(image, 1, ext, params)).shape == (24, 40, 3)
    assert_rotated_clockwise(decode_image(with_exif_orientation(image, 6, ext, params)), atol=atol)


def test_grey_and_16_bit_pngs_with_exif_orientation() -> None:
    grey = cv2.cvtColor(red_left_blue_right(24, 40), cv2.COLOR_BGR2GRAY)
    decoded = decode_image(with_exif_orientation(grey, 6, ".png"))
    assert decoded.shape == (40, 24, 3)
    assert (decoded[:15] == grey[0, 0]).all() and (decoded[-15:] == grey[0, -1]).all()

    deep = red_left_blue_right(24, 40).astype(np.uint16) * 257
    assert_rotated_clockwise(decode_image(with_exif_orientation(deep, 6, ".png")), atol=0)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(("ext", "params"), [(".png", None), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])])
def test_alpha_images_are_composited_and_oriented(ext: str, params: list[int] | None, orientation: int) -> None:
    """An image with alpha is read unchanged and oriented by hand: every orientation must match what
    OpenCV's own colour path makes of the same pixels without alpha (a transparent pixel is white)."""
    rgb = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    rgb[0, 1] = 255  # white where the alpha version is transparent
    bgra = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
    bgra[0, 1] = (0, 0, 255, 0)  # transparent red
    opaque = with_exif_orientation(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), orientation, ".png")
    expected = cv2.imdecode(np.frombuffer(opaque, np.uint8), cv2.IMREAD_COLOR_RGB)
    assert expected is not None
    assert expected.shape == ((5, 7, 3) if orientation < 5 else (7, 5, 3))
    np.testing.assert_array_equal(decode_image(with_exif_orientation(bgra, orientation, ext, params)), expected)


def test_png_transparency_chunk_is_composited() -> None:
    """An RGB PNG whose tRNS chunk makes one colour transparent: that colour becomes white."""
    data = encode(red_left_blue_right(), ".png")
    assert data[25] == 2  # RGB, no alpha channel
    transparent_blue = png_chunk(b"tRNS", struct.pack(">HHH", *BLUE_RGB))
    decoded = decode_image(data[:33] + transparent_blue + data[33:])  # right after IHDR
    assert (decoded[:, :20] == RED_RGB).all() and (decoded[:, 20:] == 255).all()


def test_grey_alpha_png_is_composited() -> None:
    grey = np.array([[0, 100], [200, 50]], np.uint8)
    alpha = np.array([[255, 0], [255, 128]], np.uint8)
    decoded = decode_image(grey_alpha_png(grey, alpha))
    assert decoded.shape == (2, 2, 3)
    assert tuple(decoded[0, 0]) == (0, 0, 0) and tuple(decoded[0, 1]) == (255, 255, 255)
    assert tuple(decoded[1, 0]) == (200, 200, 200)
    np.testing.assert_allclose(decoded[1, 1].astype(int), [152] * 3, atol=1)  # 50 * a + 255 * (1 - a)


def test_16_bit_rgba_png_is_composited() -> None:
    bgra = np.zeros((1, 2, 4), np.uint16)
    bgra[0, 0] = (0, 0, 65535, 65535)  # opaque red
    bgra[0, 1] = (0, 0, 65535, 0)  # transparent red
    decoded = decode_image(encode(bgra, ".png"))
    assert decoded.dtype == np.uint8
    assert tuple(decoded[0, 0]) == (255, 0, 0) and tuple(decoded[0, 1]) == (255, 255, 255)


@pytest.mark.parametrize("alpha", [False, True])
def test_tiff_orientation_is_applied_by_opencv(alpha: bool) -> None:
    """OpenCV's TIFF reader applies the Orientation tag itself, even when reading unchanged."""
    rgb = cv2.cvtColor(red_left_blue_right(24, 40), cv2.COLOR_BGR2RGB)
    if alpha:
        rgb = np.dstack([rgb, np.full((24, 40), 255, np.uint8)])
        rgb[0, 0, 3] = 0  # transparent: white after compositing
    assert decode_image(tiff_with_orientation(rgb, 1)).shape == (24, 40, 3)
    rotated = decode_image(tiff_with_orientation(rgb, 6))
    assert tuple(rotated[0, -1]) == ((255, 255, 255) if alpha else RED_RGB)  # top-left went to top-right
    rotated[0, -1] = RED_RGB
    assert_rotated_clockwise(rotated, atol=0)


@pytest.mark.parametrize(
    ("data", "error_type"),
    [
        (b"", "empty_file"),
        (b"this is not an image at all", "corrupt_image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "corrupt_image"),  # a JPEG magic and nothing else
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "corrupt_image"),
    ],
)
def test_bad_bytes_are_decode_errors(data: bytes, error_type: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_image(data)
    assert caught.value.error_type == error_type
    assert caught.value.stage == Stage.DECODE


def with_one_pixel(value: float, shape: tuple[int, ...] = (6, 8, 3), dtype: type = np.float32) -> np.ndarray:
    """A float image of mid-grey with ``value`` at one pixel."""
    image: np.ndarray = np.full(shape, 0.5, dtype)
    image[2, 3] = value
    return image


@pytest.mark.parametrize(
    ("image", "ext"),
    [
        pytest.param(np.full((6, 8), np.nan, np.float32), ".tiff", id="nan-grey"),
        pytest.param(np.full((6, 8, 3), np.nan, np.float32), ".tiff", id="nan-colour"),
        pytest.param(np.full((6, 8, 3), np.inf, np.float32), ".tiff", id="inf"),
        pytest.param(np.full((6, 8, 3), -np.inf, np.float32), ".tiff", id="minus-inf"),
        pytest.param(with_one_pixel(np.nan), ".tiff", id="one-nan"),
        pytest.param(with_one_pixel(np.inf), ".tiff", id="one-inf"),
        pytest.param(with_one_pixel(-np.inf, shape=(6, 8)), ".tiff", id="one-minus-inf-grey"),
        pytest.param(with_one_pixel(np.nan, shape=(6, 8, 4)), ".tiff", id="one-nan-with-alpha"),
        pytest.param(with_one_pixel(np.inf, dtype=np.float64), ".tiff", id="one-inf-float64"),
        pytest.param(with_one_pixel(np.nan), ".pfm", id="one-nan-portable-float-map"),
    ],
)
def test_non_finite_pixels_are_a_decode_error(image_default: ImagePreprocessor, image: np.ndarray, ext: str) -> None:
    """NaN and Inf have no colour: scaled to 8 bits, they would turn the whole image black."""
    with pytest.raises(DecodeError) as caught:
        prepare(image_default, encode(image, ext))
    assert caught.value.error_type == "non_finite_pixels"
    assert caught.value.stage == Stage.DECODE


@pytest.mark.parametrize(
    ("image", "ext", "expected"),
    [
        pytest.param(np.full((6, 8), 0.5, np.float32), ".tiff", 127, id="grey-in-0-1"),
        pytest.param(np.full((6, 8, 3), 1.0, np.float64), ".tiff", 255, id="float64"),
        pytest.param(with_one_pixel(1000.0), ".tiff", 0, id="brighter-than-1-scaled-by-the-brightest"),
        pytest.param(np.full((6, 8, 3), 1e300, np.float64), ".tiff", 255, id="float64-past-float32-range"),
        pytest.param(np.full((6, 8, 3), 0.5, np.float32), ".pfm", 127, id="portable-float-map"),
    ],
)
def test_finite_float_images_decode(
    image_default: ImagePreprocessor, image: np.ndarray, ext: str, expected: int
) -> None:
    data = encode(image, ext)
    decoded = decode_image(data)
    assert decoded.shape == (6, 8, 3) and decoded.dtype == np.uint8
    assert tuple(decoded[0, 0]) == (expected,) * 3
    assert np.isfinite(prepare(image_default, data).windows[0]["pixel_values"]).all()


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_files_are_corrupt(ext: str) -> None:
    data = encode(red_left_blue_right(), ext)
    with pytest.raises(DecodeError) as caught:
        decode_image(data[: len(data) // 2])
    assert caught.value.error_type == "corrupt_image"


def test_images_over_the_pixel_limit_are_refused() -> None:
    preprocessor = ImagePreprocessor(limits=Limits(max_pixels=100))
    assert preprocessor.decode(encode(np.zeros((10, 10, 3), np.uint8), ".png")).shape == (10, 10, 3)
    with pytest.raises(DecodeError) as caught:
        preprocessor.decode(encode(np.zeros((10, 11, 3), np.uint8), ".png"))
    assert caught.value.error_type == "image_too_large"


# Header bombs: a few dozen bytes whose header claims width x height; decoded, each would need
# width x height x 3 bytes (10.8 GB at 60000 x 60000, 300 MB at 10000 x 10000).
def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR (with a valid CRC) claims ``width`` x ``height`` RGB, and a tiny IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + idat + png_chunk(b"IEND", b"")


def valid_png_claiming(width: int, height: int, chunks: bytes = b"") -> bytes:
    """A complete, valid 1-bit grey PNG of ``width`` x ``height`` black pixels: a real bomb that
    OpenCV would decode to ``width`` x ``height`` x 3 bytes, from a few kilobytes. ``chunks`` go
    between IHDR and IDAT."""
    raw = bytes((1 + (width + 7) // 8) * height)  # filter byte 0 and zero bits on every row
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = png_chunk(b"IDAT", zlib.compress(raw, 9))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + chunks + idat + png_chunk(b"IEND", b"")


def tiff_claiming(width: int, height: int, size_tags: list[tuple[int, int, int]] | None = None) -> bytes:
    """A complete grey TIFF of ``width`` x ``height`` black pixels in one Deflate strip: a real bomb
    of a few kilobytes. ``size_tags`` (tag, field type, value) replace its ImageWidth and ImageLength."""
    packer = zlib.compressobj(9)
    strip = b"".join(packer.compress(bytes(width)) for _ in range(height)) + packer.flush()
    sizes = size_tags if size_tags is not None else [(256, 4, width), (257, 4, height)]
    rest = [(258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, 8), (277, 3, 1), (278, 4, height), (279, 4, len(strip))]
    entries = b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in sizes + rest)
    strip += bytes(len(strip) % 2)  # the IFD starts on a word boundary
    ifd = struct.pack("<H", len(sizes + rest)) + entries + bytes(4)  # no next IFD
    return b"II*\x00" + struct.pack("<I", 8 + len(strip)) + strip + ifd


def big_tiff(grey: np.ndarray) -> bytes:
    """An uncompressed 8-bit grey BigTIFF (8-byte offsets), which OpenCV's TIFF writer does not write."""
    height, width = grey.shape
    pixels = grey.tobytes() + bytes(grey.nbytes % 2)
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 16)]
    entries += [(277, 3, 1), (278, 4, height), (279, 4, grey.nbytes)]
    ifd = struct.pack("<Q", len(entries)) + b"".join(struct.pack("<HHQQ", *entry[:2], 1, entry[2]) for entry in entries)
    return b"II+\x00" + struct.pack("<HHQ", 8, 0, 16 + len(pixels)) + pixels + ifd + bytes(8)


def jpeg_claiming(width: int, height: int) -> bytes:
    """An 8 x 8 JPEG whose SOF0 segment is rewritten to claim ``width`` x ``height``."""
    data = bytearray(encode(np.zeros((8, 8, 3), np.uint8), ".jpg"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose logical screen and only frame claim ``width`` x ``height``, with one data block."""
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b";"


def bmp_claiming(width: int, height: int) -> bytes:
    """A 24-bit BMP whose BITMAPINFOHEADER claims ``width`` x ``height``, with 16 bytes of pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 14 + 40) + info + bytes(16)


@pytest.mark.parametrize(
    ("make", "width", "height"),
    [
        (png_claiming, 10000, 10000),
        (valid_png_claiming, 10000, 10000),
        (jpeg_claiming, 10000, 10000),
        (gif_claiming, 10000, 10000),
        (bmp_claiming, 10000, 10000),
        (tiff_claiming, 10000, 10000),
        (lambda width, height: b"PF\n%d %d\n-1.0\n" % (width, height), 10000, 10000),
        # Over twice Pillow's own MAX_IMAGE_PIXELS, where Image.open raises before giving the size.
        (png_claiming, 60000, 60000),
        (jpeg_claiming, 60000, 60000),
        (gif_claiming, 60000, 60000),
        (bmp_claiming, 60000, 60000),
    ],
)
def test_header_bombs_are_refused_before_decoding(
    make: Callable[[int, int], bytes],
    width: int,
    height: int,
    monkeypatch: pytest.MonkeyPatch,
    recwarn: pytest.WarningsRecorder,
) -> None:
    """Refused from the header alone: never decoded, in well under 10 MB, where decoding would take
    300 MB or more (``valid_png_claiming(10000, 10000)`` decodes, in 2 s, to
    300 MB). Pillow's bomb warning (over 89478485 pixels) stays quiet."""
    data = make(width, height)
    assert len(data) < 128 * 1024  # the TIFF's strip: 1 byte per kilobyte of pixels
    preprocessor = ImagePreprocessor()  # the default limit: 64000000 pixels
    Image.init()  # Pillow imports its format plugins once: that is not the probe's cost

    def must_not_decode(data: bytes) -> np.ndarray:
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(image_module, "decode_image", must_not_decode)
    error, peak = decode_error_and_peak(preprocessor, data)
    assert peak < 10 * 1024 * 1024
    assert error.error_type == "image_too_large" and error.stage == Stage.DECODE
    assert str(error) == f"{width}x{height} pixels is over the 64000000 limit"
    assert not recwarn.list


def decode_error_and_peak(preprocessor: ImagePreprocessor, data: bytes) -> tuple[DecodeError, int]:
    """The error ``data`` must decode to, and the most memory Python allocated on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as caught:
            preprocessor.decode(data)
        return caught.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


UNREADABLE = "unreadable_image_header"
HUGE_CHUNK = zlib.compress(bytes(4 << 20), 9)  # 4 MiB once inflated: over Pillow's 1 MiB cap on a chunk

# Files of a few kilobytes claiming width x height (the arguments), whose header Pillow cannot parse
# or reads otherwise than OpenCV's decoder, each with the error type it must give. Those with a bad
# CRC or a huge chunk, and the TIFF with repeated size tags, are real bombs: OpenCV decodes them whole.
HOSTILE_IMAGES: dict[str, tuple[Callable[[int, int], bytes], str]] = {
    "png-tEXt-bad-crc": (lambda w, h: valid_png_claiming(w, h, with_bad_crc(png_chunk(b"tEXt", b"a\0b"))), UNREADABLE),
    "png-zTXt-bad-crc": (
        lambda w, h: valid_png_claiming(w, h, with_bad_crc(png_chunk(b"zTXt", b"a\0\0" + zlib.compress(b"b")))),
        UNREADABLE,
    ),
    "png-iTXt-bad-crc": (
        lambda w, h: valid_png_claiming(w, h, with_bad_crc(png_chunk(b"iTXt", b"a\0\0\0\0\0b"))),
        UNREADABLE,
    ),
    "png-huge-zTXt": (lambda w, h: valid_png_claiming(w, h, png_chunk(b"zTXt", b"a\0\0" + HUGE_CHUNK)), UNREADABLE),
    "png-huge-iCCP": (lambda w, h: valid_png_claiming(w, h, png_chunk(b"iCCP", b"icc\0\0" + HUGE_CHUNK)), UNREADABLE),
    "png-IHDR-cut-short": (
        lambda w, h: patched(valid_png_claiming(w, h), b"IHDR", -4, struct.pack(">I", 10)),  # 10 of its 13 bytes
        UNREADABLE,
    ),
    "jpeg-12-bit-SOF": (lambda w, h: patched(jpeg_claiming(w, h), b"\xff\xc0", 4, b"\x0c"), UNREADABLE),
    "jpeg-SOF-cut-short": (lambda w, h: patched(jpeg_claiming(w, h), b"\xff\xc0", 2, b"\x00\x05"), UNREADABLE),
    "gif-screen-without-frame": (lambda w, h: gif_claiming(w, h)[:13] + b";", UNREADABLE),
    "tiff-IFD-past-the-end": (
        lambda w, h: patched(tiff_claiming(w, 1), b"II*", 4, struct.pack("<I", 1 << 30)),
        UNREADABLE,
    ),
    "tiff-width-as-LONG8": (lambda w, h: tiff_claiming(w, 1, [(256, 16, 8), (257, 4, h)]), UNREADABLE),
    # libtiff reads the first of a repeated tag, Pillow the last (1 x 1 here).
    "tiff-size-tags-repeated": (
        lambda w, h: tiff_claiming(w, h, [(256, 4, w), (256, 4, 1), (257, 4, h), (257, 4, 1)]),
        "image_too_large",
    ),
    "pfm-size-not-a-number": (lambda w, h: b"PF\n%d %dx\n-1.0\n" % (w, h), UNREADABLE),
}


@pytest.mark.parametrize("name", HOSTILE_IMAGES)
def test_hostile_headers_are_error_rows_never_decoded(name: str) -> None:
    """Fail closed: a header that cannot be parsed is an error row, and the bomb behind it is never
    decoded (10000 x 10000 pixels would take 300 MB)."""
    make, error_type = HOSTILE_IMAGES[name]
    data = make(10000, 10000)
    Image.init()
    error, peak = decode_error_and_peak(ImagePreprocessor(), data)
    assert error.error_type == error_type and error.stage == Stage.DECODE
    assert peak < 10 * 1024 * 1024


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(encode(np.zeros((8, 12, 3), np.uint8), ext, params), id=ext[1:])
        for ext, params in [
            (".png", []),
            (".jpg", []),
            (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
            (".avif", []),
            (".bmp", []),
            (".tiff", []),
            (".gif", []),
            (".ppm", []),
            (".pfm", []),
            (".ras", []),
        ]
    ]
    + [
        pytest.param(encode(np.zeros((8, 12), np.uint8), ".pgm"), id="pgm"),
        pytest.param(encode(np.zeros((8, 12, 3), np.uint16), ".png"), id="png-16-bit"),
        # Formats whose size is read here, not by Pillow, which cannot open them.
        pytest.param(encode(np.zeros((8, 12, 3), np.float32), ".tiff"), id="tiff-float"),
        pytest.param(encode(np.zeros((8, 12, 4), np.float64), ".tiff"), id="tiff-float64-alpha"),
        pytest.param(encode(np.zeros((8, 12, 3), np.int16), ".tiff"), id="tiff-signed"),
        pytest.param(tiff_with_orientation(np.zeros((8, 12, 3), np.uint8), 1), id="tiff-hand-made"),
        pytest.param(big_tiff(np.zeros((8, 12), np.uint8)), id="bigtiff"),
        pytest.param(encode(np.zeros((8, 12), np.float32), ".pfm"), id="pfm-grey"),
    ],
)
def test_images_exactly_at_the_pixel_limit_pass(data: bytes) -> None:
    decoded = ImagePreprocessor(limits=Limits(max_pixels=96)).decode(data)
    np.testing.assert_array_equal(decoded, decode_image(data))
    assert decoded.shape == (8, 12, 3)
    with pytest.raises(DecodeError) as caught:
        ImagePreprocessor(limits=Limits(max_pixels=95)).decode(data)
    assert caught.value.error_type == "image_too_large"
    assert str(caught.value) == "12x8 pixels is over the 95 limit"


@pytest.mark.parametrize(
    ("data", "error_type"),
    [
        pytest.param(b"", "empty_file", id="empty"),
        pytest.param(b"this is not an image at all", "corrupt_image", id="text"),
        pytest.param(b"qoif" + struct.pack(">IIBB", 60000, 60000, 3, 0), "corrupt_image", id="qoi"),  # Pillow only
        # OpenCV reads Radiance HDR and PAM, but no header reader here does.
        pytest.param(encode(np.zeros((8, 12, 3), np.float32), ".hdr"), "corrupt_image", id="hdr"),
        pytest.param(encode(np.zeros((8, 12, 3), np.uint8), ".pam"), "corrupt_image", id="pam"),
        pytest.param(b"\xff\xd8\xff\xe0" + b"\x00" * 64, UNREADABLE, id="jpeg-signature-only"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, UNREADABLE, id="png-signature-only"),
        pytest.param(png_claiming(8, 8)[:20], UNREADABLE, id="png-IHDR-cut"),
        pytest.param(b"II*\x00" + bytes(4), UNREADABLE, id="tiff-empty-IFD"),
        pytest.param(
            b"II+\x00" + struct.pack("<HHQ", 8, 0, 2**63) + bytes(16), UNREADABLE, id="bigtiff-IFD-past-any-index"
        ),
        pytest.param(b"MM\x00+" + bytes(12), UNREADABLE, id="bigtiff-empty-IFD"),
        pytest.param(b"PF\n12", UNREADABLE, id="pfm-cut"),
    ],
)
def test_sizes_that_cannot_be_read_are_never_decoded(data: bytes, error_type: str) -> None:
    """Fail closed: bytes in no format whose size is read here, and bytes in one whose header cannot
    be parsed, are error rows before OpenCV sees them."""
    with pytest.raises(DecodeError) as caught:
        ImagePreprocessor().decode(data)
    assert caught.value.error_type == error_type


def test_a_limit_over_pillows_own_guard_is_the_authority() -> None:
    """With a limit above twice Pillow's MAX_IMAGE_PIXELS, the size Pillow's header reader gives is
    checked against it, and OpenCV judges the bytes: here it refuses 3.6 G pixels, over its own cap."""
    with pytest.raises(DecodeError) as caught:
        ImagePreprocessor(limits=Limits(max_pixels=10**10)).decode(png_claiming(60000, 60000))
    assert caught.value.error_type == "corrupt_image"


# -- resize and crop -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(480, 640), (640, 480), (256, 256), (10, 7), (1, 1), (3, 500), (300, 2)])
def test_resize_and_crop_gives_the_crop_size(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert resize_and_crop(image, 256, 224).shape == (224, 224, 3)
    assert resize_and_crop(image, 32, 32).shape == (32, 32, 3)


@pytest.mark.parametrize("shape", [(480, 640), (523, 700), (300, 200), (100, 180)])
def test_resize_matches_the_pillow_bilinear_reference(shape: tuple[int, int]) -> None:
    """torchvision's ImageNet models were trained on Pillow's antialiased bilinear resize: downscaled
    (and upscaled) crops match it to a small fraction of a grey level, where OpenCV's INTER_AREA
    (down) and INTER_LINEAR (up) are off by 0.2 to 1 on these images."""
    height, width = shape
    image = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8), (5, 5), 1.5)
    scale = 256 / min(height, width)
    size = (round(width * scale), round(height * scale))
    reference = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
    top, left = (size[1] - 224) // 2, (size[0] - 224) // 2
    crop = resize_and_crop(image, 256, 224).astype(np.float64)
    assert np.abs(crop - reference[top : top + 224, left : left + 224]).mean() < 0.05


def test_resize_and_crop_keeps_the_centre() -> None:
    landscape = np.zeros((100, 300, 3), np.uint8)
    landscape[:, 100:200] = 255  # the centre third is white
    crop = resize_and_crop(landscape, 50, 50)
    assert crop.shape == (50, 50, 3)
    assert (crop[:, 2:-2] == 255).all()

    portrait = np.ascontiguousarray(landscape.transpose(1, 0, 2))
    assert (resize_and_crop(portrait, 50, 50)[2:-2] == 255).all()


def test_resize_and_crop_of_a_thin_strip_is_cheap() -> None:
    """Only the centre of a very elongated image is kept, so only the centre is resized: a
    2 x 2000 strip must not become a 256 x 256000 image first (a 1 x 60000 PNG of a few hundred
    bytes would otherwise need about 12 GB)."""
    strip = np.zeros((2, 2000, 3), np.uint8)
    strip[:, 998:1002] = 255
    tracemalloc.start()
    try:
        crop = resize_and_crop(strip, 256, 224)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert crop.shape == (224, 224, 3)
    assert peak < 20 * 1024 * 1024
    assert crop[:, 112].min() == 255  # the white centre is still the centre


# -- models --------------------------------------------------------------------------------------
def test_normalize_gives_standardised_pixels_channels_last_in_memory() -> None:
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    pixels = normalize(image, mean, std)

    assert pixels.shape == (3, 30, 40) and pixels.dtype == np.float32
    assert pixels.transpose(1, 2, 0).flags["C_CONTIGUOUS"]
    for channel in range(3):  # channel order kept: no RGB/BGR swap
        expected = (image[:, :, channel] / 255.0 - mean[channel]) / std[channel]
        np.testing.assert_allclose(pixels[channel], expected, atol=1e-5)


def test_default_model_gives_1280_d_finite_embeddings(image_default, image_default_encoder, embed, cos) -> None:
    assert IMAGE.dimension(image_default) == image_default_encoder.dimension == 1280
    assert isinstance(image_default_encoder, MobileNetV2Encoder)
    settings = image_default.settings()
    assert (settings["resize_shorter_side"], settings["crop"]) == (256, 224)

    rng = np.random.default_rng(1)
    photo = cv2.GaussianBlur(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), (9, 9), 3)
    flat = np.full((200, 200, 3), 128, np.uint8)
    windows = image_default.preprocess(image_default.decode(encode(photo, ".png")))
    assert len(windows) == 1 and windows[0]["pixel_values"].shape == (3, 224, 224)
    assert windows[0]["pixel_values"].dtype == np.float32

    first, second, grey = embed(
        image_default, image_default_encoder, [encode(photo, ".png"), encode(photo, ".bmp"), encode(flat, ".png")]
    )
    assert first.shape == (1280,)
    assert np.all(np.isfinite(first)) and np.all(np.isfinite(grey))
    np.testing.assert_allclose(first, second, atol=1e-5)  # same pixels, different container
    assert cos(first, grey) < 0.999


def test_default_embedding_alone_equals_embedding_in_a_batch(image_default, image_default_encoder, embed) -> None:
    image = encode(red_left_blue_right(), ".png")
    other = encode(np.full((50, 60, 3), 200, np.uint8), ".png")
    (alone,) = embed(image_default, image_default_encoder, [image])
    batched = embed(image_default, image_default_encoder, [other, image])
    np.testing.assert_allclose(batched[1], alone, atol=1e-4)


def test_tiny_vit_folder_runs_end_to_end(tiny_vit_dir: Path, embed) -> None:
    preprocessor = ImagePreprocessor(model=str(tiny_vit_dir))
    assert preprocessor.resolved.bundled is False
    assert IMAGE.dimension(preprocessor) == 32
    settings = preprocessor.settings()
    assert (settings["resize_shorter_side"], settings["crop"]) == (32, 32)
    assert (settings["mean"], settings["std"]) == ([0.5] * 3, [0.25] * 3)

    windows = preprocessor.preprocess(preprocessor.decode(encode(red_left_blue_right(48, 80), ".png")))
    pixels = windows[0]["pixel_values"]
    assert pixels.shape == (3, 32, 32)
    assert pixels[0, 0, 0] == pytest.approx((1.0 - 0.5) / 0.25)  # red channel of a red pixel

    encoder = IMAGE.load_encoder(preprocessor, "cpu")
    assert type(encoder) is ImageEncoder  # a Hugging Face model, not the bundled MobileNetV2
    assert encoder.dimension == 32
    assert not encoder.model.training
    batch = encoder.collate(windows * 2)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    # Channels-last in memory, as the tensor the runtime makes of it (torch.from_numpy) shows.
    assert torch.from_numpy(batch["pixel_values"]).is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(batch["pixel_values"][1], pixels)
    assert forward(encoder, windows * 2).shape == (2, 32)

    first, second = embed(
        preprocessor, encoder, [encode(red_left_blue_right(), ".png"), encode(np.zeros((40, 40), np.uint8), ".png")]
    )
    assert first.shape == (32,) and np.all(np.isfinite(first))
    assert not np.allclose(first, second)


def test_hugging_face_settings_accept_one_mean_and_std_for_all_channels(tiny_vit_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_vit_dir / name).read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": 0.5, "image_std": [0.25]}))
    preprocessor = ImagePreprocessor(model=str(tmp_path))
    assert (preprocessor.settings()["mean"], preprocessor.settings()["std"]) == ([0.5] * 3, [0.25] * 3)
    assert (preprocessor.mean, preprocessor.std) == ([0.5] * 3, [0.25] * 3)
    pixels = preprocessor.preprocess(np.full((40, 40, 3), 255, np.uint8))[0]["pixel_values"]
    np.testing.assert_allclose(pixels, (1.0 - 0.5) / 0.25, rtol=1e-6)


def test_resize_and_crop_accepts_mirrored_views() -> None:
    image = np.random.default_rng(2).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    mirrored = resize_and_crop(image[:, ::-1], 32, 32)
    np.testing.assert_array_equal(mirrored, resize_and_crop(np.ascontiguousarray(image[:, ::-1]), 32, 32))


def test_hugging_face_settings_accept_integer_sizes(tiny_vit_dir: Path, tmp_path: Path) -> None:
    """Older ``preprocessor_config.json`` files give ``size`` and ``crop_size`` as plain ints."""
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_vit_dir / name).read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": 40, "crop_size": 32, "image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2]})
    )
    preprocessor = ImagePreprocessor(model=str(tmp_path))
    settings = preprocessor.settings()
    assert (settings["resize_shorter_side"], settings["crop"]) == (40, 32)
    assert (preprocessor.resize_shorter_side, preprocessor.crop) == (40, 32)
    assert preprocessor.preprocess(np.zeros((50, 70, 3), np.uint8))[0]["pixel_values"].shape == (3, 32, 32)
