"""Image modality: decoding every format with OpenCV, colour handling (grey, alpha, 16-bit, EXIF
orientation), decode errors, resize-and-crop geometry, and embeddings from the default MobileNetV2
and a tiny random ViT loaded from a ``save_pretrained`` folder."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from mmfeatures.errors import DecodeError, Stage
from mmfeatures.modalities.base import Limits
from mmfeatures.modalities.image import ImageModality, decode_image, resize_and_crop

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


def jpeg_with_exif_orientation(image: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose APP1 EXIF block holds one tag: Orientation (0x0112, SHORT) = ``orientation``."""
    tiff = (
        b"II*\x00"
        + struct.pack("<I", 8)  # offset of IFD0
        + struct.pack("<H", 1)  # one entry
        + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
        + struct.pack("<I", 0)  # no next IFD
    )
    ok, buffer = cv2.imencodeWithMetadata(
        ".jpg", image, [cv2.IMAGE_METADATA_EXIF], [np.frombuffer(tiff, np.uint8)], [cv2.IMWRITE_JPEG_QUALITY, 95]
    )
    assert ok
    data = buffer.tobytes()
    assert b"Exif\x00\x00II*\x00" in data[:64]
    return data


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
    assert decode_image(jpeg_with_exif_orientation(image, 1)).shape == (24, 40, 3)

    rotated = decode_image(jpeg_with_exif_orientation(image, 6))  # 6: rotate 90 degrees clockwise
    assert rotated.shape == (40, 24, 3)
    # Rotated clockwise, the left (red) half ends on top and the right (blue) half at the bottom.
    np.testing.assert_allclose(rotated[:15].reshape(-1, 3).mean(0), RED_RGB, atol=10)
    np.testing.assert_allclose(rotated[-15:].reshape(-1, 3).mean(0), BLUE_RGB, atol=10)

    flipped = decode_image(jpeg_with_exif_orientation(image, 3))  # 3: rotate 180 degrees
    assert flipped.shape == (24, 40, 3)
    np.testing.assert_allclose(flipped[:, :15].reshape(-1, 3).mean(0), BLUE_RGB, atol=10)


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


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_files_are_corrupt(ext: str) -> None:
    data = encode(red_left_blue_right(), ext)
    with pytest.raises(DecodeError) as caught:
        decode_image(data[: len(data) // 2])
    assert caught.value.error_type == "corrupt_image"


def test_images_over_the_pixel_limit_are_refused() -> None:
    modality = ImageModality(limits=Limits(max_pixels=100))
    assert modality.decode(encode(np.zeros((10, 10, 3), np.uint8), ".png")).shape == (10, 10, 3)
    with pytest.raises(DecodeError) as caught:
        modality.decode(encode(np.zeros((10, 11, 3), np.uint8), ".png"))
    assert caught.value.error_type == "image_too_large"


# -- resize and crop -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(480, 640), (640, 480), (256, 256), (10, 7), (1, 1), (3, 500), (300, 2)])
def test_resize_and_crop_gives_the_crop_size(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert resize_and_crop(image, 256, 224).shape == (224, 224, 3)
    assert resize_and_crop(image, 32, 32).shape == (32, 32, 3)


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
def test_default_model_gives_1280_d_finite_embeddings(image_default, image_default_model, embed, cos) -> None:
    assert image_default.dimension() == 1280
    settings = image_default.settings()
    assert (settings["resize_shorter_side"], settings["crop"]) == (256, 224)

    rng = np.random.default_rng(1)
    photo = cv2.GaussianBlur(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), (9, 9), 3)
    flat = np.full((200, 200, 3), 128, np.uint8)
    windows = image_default.preprocess(image_default.decode(encode(photo, ".png")))
    assert len(windows) == 1 and windows[0]["pixel_values"].shape == (3, 224, 224)
    assert windows[0]["pixel_values"].dtype == np.float32

    first, second, grey = embed(
        image_default, image_default_model, [encode(photo, ".png"), encode(photo, ".bmp"), encode(flat, ".png")]
    )
    assert first.shape == (1280,)
    assert np.all(np.isfinite(first)) and np.all(np.isfinite(grey))
    np.testing.assert_allclose(first, second, atol=1e-5)  # same pixels, different container
    assert cos(first, grey) < 0.999


def test_default_embedding_alone_equals_embedding_in_a_batch(image_default, image_default_model, embed) -> None:
    image = encode(red_left_blue_right(), ".png")
    other = encode(np.full((50, 60, 3), 200, np.uint8), ".png")
    (alone,) = embed(image_default, image_default_model, [image])
    batched = embed(image_default, image_default_model, [other, image])
    np.testing.assert_allclose(batched[1], alone, atol=1e-4)


def test_tiny_vit_folder_runs_end_to_end(tiny_vit_dir: Path, embed) -> None:
    modality = ImageModality(model=str(tiny_vit_dir))
    modality.setup()
    assert modality.resolved.bundled is False
    assert modality.dimension() == 32
    settings = modality.settings()
    assert (settings["resize_shorter_side"], settings["crop"]) == (32, 32)
    assert (settings["mean"], settings["std"]) == ([0.5] * 3, [0.25] * 3)

    windows = modality.preprocess(modality.decode(encode(red_left_blue_right(48, 80), ".png")))
    pixels = windows[0]["pixel_values"]
    assert pixels.shape == (3, 32, 32)
    assert pixels[0, 0, 0] == pytest.approx((1.0 - 0.5) / 0.25)  # red channel of a red pixel

    model = modality.load_model("cpu")
    assert not model.training
    batch = modality.collate(windows * 2)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert modality.encode(model, batch).shape == (2, 32)

    first, second = embed(
        modality, model, [encode(red_left_blue_right(), ".png"), encode(np.zeros((40, 40), np.uint8), ".png")]
    )
    assert first.shape == (32,) and np.all(np.isfinite(first))
    assert not np.allclose(first, second)


def test_hugging_face_settings_accept_integer_sizes(tiny_vit_dir: Path, tmp_path: Path) -> None:
    """Older ``preprocessor_config.json`` files give ``size`` and ``crop_size`` as plain ints."""
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_vit_dir / name).read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": 40, "crop_size": 32, "image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2]})
    )
    modality = ImageModality(model=str(tmp_path))
    settings = modality.settings()
    assert (settings["resize_shorter_side"], settings["crop"]) == (40, 32)
    assert modality.preprocess(np.zeros((50, 70, 3), np.uint8))[0]["pixel_values"].shape == (3, 32, 32)
