"""Images: decoded with OpenCV (JPEG, PNG, WebP, BMP, TIFF; grey and alpha to RGB; EXIF orientation
applied to JPEGs), the shorter side resized and centre-cropped to the model's input size, normalised
with the model's mean and std. The default model is ImageNet MobileNetV2 (1280-d pooled features);
any Hugging Face vision encoder folder or id works too."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import cv2
import numpy as np
import torch
from transformers import AutoConfig, AutoModel

from mmfeatures.encoders import mobilenet_v2
from mmfeatures.encoders.models import pretrained_kwargs
from mmfeatures.errors import DecodeError
from mmfeatures.modalities.base import Modality, Window

# Corrupt inputs are reported as error rows; OpenCV's own warnings about them would only be noise.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

_JPEG_MAGIC = b"\xff\xd8\xff"
_BACKGROUND = 255.0  # transparent pixels are composited onto white


def decode_image(data: bytes) -> np.ndarray:
    """Bytes to an RGB uint8 array [H, W, 3]; raises ``DecodeError`` when OpenCV cannot read them.

    JPEGs go through OpenCV's colour path, which applies their EXIF orientation; other formats are
    read unchanged so that an alpha channel can be composited rather than dropped.
    """
    if not data:
        raise DecodeError("the image file is empty", error_type="empty_file")
    buffer = np.frombuffer(data, dtype=np.uint8)
    flags = cv2.IMREAD_COLOR_RGB if data.startswith(_JPEG_MAGIC) else cv2.IMREAD_UNCHANGED
    try:
        image = cv2.imdecode(buffer, flags)
    except cv2.error as exc:
        raise DecodeError(f"OpenCV could not decode the image: {exc}", error_type="corrupt_image") from exc
    if image is None or image.size == 0:
        raise DecodeError("not an image OpenCV can read, or a corrupt one", error_type="corrupt_image")
    if flags == cv2.IMREAD_COLOR_RGB:
        return image
    return _to_rgb(image)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:  # 16-bit PNG/TIFF, float TIFF
        scale = 255.0 / (65535.0 if image.dtype == np.uint16 else max(float(image.max()), 1.0))
        image = np.clip(image.astype(np.float32) * scale, 0, 255).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        colour = image[:, :, :3].astype(np.float32)
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        image = (colour * alpha + _BACKGROUND * (1.0 - alpha)).round().astype(np.uint8)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize_and_crop(image: np.ndarray, resize_to: int, crop_to: int) -> np.ndarray:
    """Resize the shorter side to ``resize_to`` and take the centre ``crop_to`` square."""
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
    size = (max(crop_to, round(width * scale)), max(crop_to, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, size, interpolation=interpolation)
    top = (resized.shape[0] - crop_to) // 2
    left = (resized.shape[1] - crop_to) // 2
    return resized[top : top + crop_to, left : left + crop_to]


class ImageModality(Modality):
    name = "image"

    _settings: dict[str, Any] | None = None

    def setup(self) -> None:
        if self._settings is not None:
            return
        resolved = self.resolved
        if resolved.bundled:
            self._settings = {
                "resize_shorter_side": mobilenet_v2.RESIZE_SIZE,
                "crop": mobilenet_v2.INPUT_SIZE,
                "mean": list(mobilenet_v2.IMAGENET_MEAN),
                "std": list(mobilenet_v2.IMAGENET_STD),
            }
        else:
            self._settings = _hugging_face_image_settings(resolved.directory)

    def decode(self, payload: bytes | str) -> np.ndarray:
        image = decode_image(payload)  # type: ignore[arg-type]
        if image.shape[0] * image.shape[1] > self.limits.max_pixels:
            raise DecodeError(
                f"{image.shape[1]}x{image.shape[0]} pixels is over the {self.limits.max_pixels} limit",
                error_type="image_too_large",
            )
        return image

    def preprocess(self, raw: np.ndarray) -> list[Window]:
        self.setup()
        settings = self._settings
        assert settings is not None
        crop = resize_and_crop(raw, settings["resize_shorter_side"], settings["crop"])
        mean = np.asarray(settings["mean"], dtype=np.float32)
        std = np.asarray(settings["std"], dtype=np.float32)
        pixels = (crop.astype(np.float32) / 255.0 - mean) / std
        return [{"pixel_values": np.ascontiguousarray(pixels.transpose(2, 0, 1))}]

    def settings(self) -> dict[str, Any]:
        self.setup()
        return {"decoder": "opencv", "color": "RGB", **(self._settings or {})}

    def dimension(self) -> int:
        if self.resolved.bundled:
            return mobilenet_v2.FEATURE_DIM
        config = AutoConfig.from_pretrained(self.resolved.directory)
        return getattr(config, "hidden_size", None) or config.hidden_sizes[-1]

    def load_model(self, device: str) -> torch.nn.Module:
        resolved = self.resolved
        if resolved.bundled:
            model: torch.nn.Module = mobilenet_v2.load_mobilenet_v2(resolved.weight_files[0])
        else:
            model = AutoModel.from_pretrained(resolved.directory, **pretrained_kwargs())
        return model.eval().requires_grad_(False).to(device)

    def collate(self, windows: list[Window], length: int = 0) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.from_numpy(np.stack([w["pixel_values"] for w in windows]))}

    def encode(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(model, mobilenet_v2.MobileNetV2):
            return model.forward_features(batch["pixel_values"])
        output = model(pixel_values=batch["pixel_values"])
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        return output.last_hidden_state.mean(dim=1)


def _hugging_face_image_settings(directory: str) -> dict[str, Any]:
    """Input size, mean and std from a Hugging Face ``preprocessor_config.json``."""
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
    model_config = AutoConfig.from_pretrained(directory)
    default_side = getattr(model_config, "image_size", mobilenet_v2.INPUT_SIZE)
    crop_side = crop.get("height") or size.get("height") or default_side
    return {
        "resize_shorter_side": size.get("shortest_edge") or crop_side,
        "crop": crop_side,
        "mean": list(config.get("image_mean", mobilenet_v2.IMAGENET_MEAN)),
        "std": list(config.get("image_std", mobilenet_v2.IMAGENET_STD)),
    }
