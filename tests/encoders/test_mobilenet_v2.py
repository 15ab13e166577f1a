"""MobileNetV2 encoder checked against the real ImageNet weights and real photos.

Classifying photos is what proves the hand-written architecture matches the
weights: a strict load only checks names and shapes, not wiring (residuals,
strides, activation placement).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skimage_data

from mmfeatures.encoders.mobilenet_v2 import MobileNetV2, load_mobilenet_v2
from mmfeatures.encoders.weights import resolve_model
from mmfeatures.modalities.image import MOBILENET_V2, ImagePreprocessor


@pytest.fixture(scope="module")
def model() -> MobileNetV2:
    return load_mobilenet_v2(resolve_model("default", MOBILENET_V2).weight_files[0])


def preprocess(rgb: np.ndarray) -> torch.Tensor:
    """The job's own image preprocessing, so the photo test covers it too."""
    (window,) = ImagePreprocessor().preprocess(rgb)
    return torch.from_numpy(window["pixel_values"])


def test_strict_load_gives_frozen_model_and_1280_features(model: MobileNetV2) -> None:
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())

    batch = torch.stack([preprocess(skimage_data.chelsea()), preprocess(skimage_data.coffee())])
    features = model.forward_features(batch)

    assert features.shape == (2, 1280)
    assert torch.isfinite(features).all()
    assert features.abs().sum() > 0
    assert model(batch).shape == (2, 1000)


@pytest.mark.parametrize(
    ("photo", "expected_classes"),
    [
        ("chelsea", {281, 282, 285}),  # tabby, tiger cat, Egyptian cat
        ("coffee", {967, 968, 504}),  # espresso, cup, coffee mug
    ],
)
def test_real_photo_top5_contains_right_imagenet_class(
    model: MobileNetV2, photo: str, expected_classes: set[int]
) -> None:
    image = preprocess(getattr(skimage_data, photo)())
    logits = model(image.unsqueeze(0))[0]

    top5 = set(logits.topk(5).indices.tolist())

    assert top5 & expected_classes, f"{photo}: top-5 {sorted(top5)} has none of {sorted(expected_classes)}"
    assert logits.argmax().item() in expected_classes


def test_batch_of_two_equals_each_alone(model: MobileNetV2) -> None:
    images = [preprocess(skimage_data.chelsea()), preprocess(skimage_data.coffee())]

    batched = model.forward_features(torch.stack(images))
    alone = torch.cat([model.forward_features(image.unsqueeze(0)) for image in images])

    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
