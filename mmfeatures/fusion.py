"""Fusion: one vector per record from whichever modality embeddings it has.

- ``concat``: each modality L2-normalised and scaled by its weight, then concatenated in a fixed
  order; a missing modality is zero-filled, so positions always mean the same thing.
- ``mean``: each L2-normalised modality projected to one common dimension by a fixed, seeded
  Gaussian projection, then averaged over the modalities present (Y = 1/n sum x_i).
- ``weighted``: like ``mean`` with user weights, renormalised over the modalities present.

The projections are a pure function of (seed, modality, input and output dimension), recorded in
the output metadata, so any reader can rebuild them with ``projection_matrix``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FUSION_METHODS = ("concat", "mean", "weighted")
FLOAT32_MAX = float(np.finfo(np.float32).max)


def parse_weights(text: str | None) -> dict[str, float]:
    """``"text=0.2,image=0.3"`` to ``{"text": 0.2, "image": 0.3}``. A weight must be a number from
    0 to float32's largest, since fused vectors are float32: ``1e39`` would make every one Inf."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, value = (part.strip() for part in item.partition("="))
        try:
            weight = float(value) if sep else math.nan
        except ValueError:
            weight = math.nan
        if not 0 <= weight <= FLOAT32_MAX:  # NaN compares false
            raise ValueError(
                f"--fusion_weights: {item!r} is not modality=weight with a finite number >= 0 "
                f"and at most {FLOAT32_MAX:.4g} (float32's largest)"
            )
        if name in weights:
            raise ValueError(f"--fusion_weights names {name!r} twice")
        weights[name] = weight
    return weights


def projection_matrix(seed: int, modality: str, input_dim: int, output_dim: int) -> np.ndarray:
    """A fixed Gaussian projection [input_dim, output_dim], scaled to keep unit vectors near unit."""
    stream = zlib.crc32(modality.encode())  # stable across processes, unlike hash()
    rng = np.random.Generator(np.random.PCG64([seed, stream]))
    return (rng.standard_normal((input_dim, output_dim)) / np.sqrt(output_dim)).astype(np.float32)


def l2_normalize(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


@dataclass
class Fusion:
    """Fuses per-modality embeddings; ``dims`` fixes the modalities and their order."""

    method: str
    dims: Mapping[str, int]
    weights: Mapping[str, float] = field(default_factory=dict)
    projection_dim: int = 512
    seed: int = 0
    _projections: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in FUSION_METHODS:
            raise ValueError(f"unknown fusion {self.method!r}; choose one of {', '.join(FUSION_METHODS)}")
        unknown = set(self.weights) - set(self.dims)
        if unknown:
            raise ValueError(f"fusion weights name unknown modalities: {', '.join(sorted(unknown))}")

    @property
    def output_dim(self) -> int:
        return sum(self.dims.values()) if self.method == "concat" else self.projection_dim

    def weight(self, modality: str) -> float:
        return float(self.weights.get(modality, 1.0))

    def _projection(self, modality: str) -> np.ndarray:
        # Built on first use, once per worker, never per record.
        if modality not in self._projections:
            self._projections[modality] = projection_matrix(
                self.seed, modality, self.dims[modality], self.projection_dim
            )
        return self._projections[modality]

    def fuse(self, embeddings: Mapping[str, np.ndarray]) -> np.ndarray:
        """The fused vector for one record; ``embeddings`` holds the modalities it has."""
        if not embeddings:
            raise ValueError("nothing to fuse")
        if self.method == "concat":
            parts = [
                l2_normalize(embeddings[m]) * self.weight(m) if m in embeddings else np.zeros(d, np.float32)
                for m, d in self.dims.items()
            ]
            return np.concatenate(parts).astype(np.float32)
        present = [m for m in self.dims if m in embeddings]
        # "mean" weighs the modalities present equally, and so does "weighted" when their weights
        # sum to zero: there is nothing to renormalise by.
        weights = {m: self.weight(m) for m in present} if self.method == "weighted" else {}
        total = sum(weights.values())
        if total > 0:
            shares = {m: weights[m] / total for m in present}
        else:
            shares = {m: 1.0 / len(present) for m in present}
        fused = sum(shares[m] * (l2_normalize(embeddings[m]) @ self._projection(m)) for m in present)
        return np.asarray(fused, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        description: dict[str, Any] = {
            "method": self.method,
            "order": list(self.dims),
            "dimension": self.output_dim,
            "weights": {m: self.weight(m) for m in self.dims},
            "normalization": "l2 per modality",
        }
        if self.method != "concat":
            description["projection"] = {
                "kind": "gaussian, N(0, 1/dim), numpy PCG64 seeded with [seed, crc32(modality)]",
                "seed": self.seed,
                "dimension": self.projection_dim,
                "function": "mmfeatures.fusion.projection_matrix",
            }
        return description
