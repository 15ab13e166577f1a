"""Models made ready to embed: eval mode, no gradients, on their device."""

from __future__ import annotations

from typing import TypeVar

import torch

Model = TypeVar("Model", bound=torch.nn.Module)


def frozen(model: Model, device: str) -> Model:
    """``model`` in eval mode (dropout off, batch norms fixed), its parameters without gradients
    (which a multi-process runner could not pickle), on ``device``."""
    return model.eval().requires_grad_(False).to(device)
