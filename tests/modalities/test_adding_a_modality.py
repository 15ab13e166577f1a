"""Adding a modality takes what the recipe in docs/adding-a-modality.md says and nothing more: one
module, one registry entry, and its columns in the two data contracts. Done here on a copy of the source tree, with a
toy modality (sensor readings embedded by a linear layer), and the job run end to end on it."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file

REPOSITORY = Path(__file__).resolve().parents[2]
READINGS = 8
DIMENSION = 4

SENSOR_MODULE = '''"""Sensor readings: an inline list of numbers, embedded by a linear layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mmfeatures.errors import DecodeError
from mmfeatures.modalities.base import Batch, Encoder, Modality, Preprocessor, Window

READINGS = 8


class SensorPreprocessor(Preprocessor):
    name = "sensor"
    inline = True
    batch_cost = 64 * READINGS

    def decode(self, payload: bytes | str) -> np.ndarray:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        try:
            values = [float(value) for value in text.split(",")][:READINGS]
        except ValueError as exc:
            raise DecodeError(f"not a list of numbers: {exc}", error_type="bad_readings") from exc
        return np.asarray(values + [0.0] * (READINGS - len(values)), dtype=np.float32)

    def preprocess(self, raw: np.ndarray) -> list[Window]:
        return [{"readings": raw}]

    def settings(self) -> dict[str, Any]:
        return {"readings": READINGS, "padding": "zeros"}


class SensorEncoder(Encoder[torch.Tensor]):
    def __init__(self, layer: torch.nn.Linear):
        self.layer = layer
        self.dimension = layer.out_features

    def collate(self, windows: Sequence[Window], length: int = 0) -> Batch:
        return {"readings": np.stack([window["readings"] for window in windows])}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.layer(batch["readings"])


def load_sensor_encoder(preprocessor: SensorPreprocessor, device: str) -> SensorEncoder:
    state = load_file(preprocessor.resolved.weight_files[0])
    layer = torch.nn.Linear(READINGS, sensor_dimension(preprocessor))
    layer.load_state_dict(state)
    return SensorEncoder(layer.eval().requires_grad_(False).to(device))


def sensor_dimension(preprocessor: SensorPreprocessor) -> int:
    with safe_open(preprocessor.resolved.weight_files[0], "np") as weights:
        return int(weights.get_slice("weight").get_shape()[0])


SENSOR = Modality(SensorPreprocessor, load_sensor_encoder, sensor_dimension)
'''


def _add_the_modality(source: Path) -> None:
    """The recipe: the module, the registry entry, the contract columns."""
    (source / "mmfeatures" / "modalities" / "sensor.py").write_text(SENSOR_MODULE)

    registry = source / "mmfeatures" / "modalities" / "__init__.py"
    text = registry.read_text()
    entries = "(TEXT, IMAGE, AUDIO)"
    assert entries in text
    text = text.replace(entries, "(TEXT, IMAGE, AUDIO, SENSOR)")
    registry.write_text(
        text.replace(
            "\nfrom mmfeatures.modalities.text",
            "\nfrom mmfeatures.modalities.sensor import SENSOR\nfrom mmfeatures.modalities.text",
            1,
        )
    )

    contracts = source / "schemas" / "v1"
    record = json.loads((contracts / "record.json").read_text())
    record["fields"].insert(4, {"name": "sensor", "type": "string", "nullable": True, "modality": True})
    (contracts / "record.json").write_text(json.dumps(record))
    features = json.loads((contracts / "features.json").read_text())
    names = [field["name"] for field in features["fields"]]
    features["fields"].insert(
        names.index("audio_embedding") + 1,
        {"name": "sensor_embedding", "type": "embedding", "modality": "sensor", "nullable": True},
    )
    names = [field["name"] for field in features["fields"]]
    features["fields"].insert(names.index("has_audio") + 1, {"name": "has_sensor", "type": "bool", "nullable": False})
    (contracts / "features.json").write_text(json.dumps(features))


def test_a_toy_fourth_modality_runs_end_to_end(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for folder in ("mmfeatures", "pipelines", "schemas"):
        shutil.copytree(REPOSITORY / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    _add_the_modality(source)

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(DIMENSION, READINGS)).astype(np.float32)
    bias = rng.normal(size=DIMENSION).astype(np.float32)
    model = tmp_path / "sensor-model"
    model.mkdir()
    save_file({"weight": weight, "bias": bias}, str(model / "model.safetensors"))

    manifest = tmp_path / "manifest.jsonl"
    rows = [
        {"id": "s1", "sensor": "1,2,3", "text": "a reading and a caption"},
        {"id": "s2", "sensor": "0.5,0.25"},
        {"id": "s3", "sensor": "warm,cold", "text": "a broken reading"},
        {"id": "t1", "text": "no reading at all"},
    ]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out"
    environment = {**os.environ, "PYTHONPATH": str(source)}
    command = [sys.executable, "-m", "pipelines.extract_features"]

    helped = subprocess.run([*command, "--help"], cwd=source, env=environment, capture_output=True, text=True)
    assert helped.returncode == 0 and "--sensor_model" in helped.stdout

    arguments = ["--input", str(manifest), "--output", str(output), "--sensor_model", str(model)]
    ran = subprocess.run([*command, *arguments], cwd=source, env=environment, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]

    features = {row["id"]: row for row in pq.read_table(output / "features").to_pylist()}
    assert sorted(features) == ["s1", "s2", "s3", "t1"]
    for record_id, readings in (("s1", [1, 2, 3]), ("s2", [0.5, 0.25])):
        padded = np.zeros(READINGS, np.float32)
        padded[: len(readings)] = readings
        np.testing.assert_allclose(features[record_id]["sensor_embedding"], weight @ padded + bias, atol=1e-5)
        assert features[record_id]["has_sensor"] is True
    assert features["s3"]["sensor_embedding"] is None and features["s3"]["has_sensor"] is False
    assert features["s3"]["failed_modalities"] == ["sensor"]
    assert features["t1"]["has_sensor"] is False and features["t1"]["failed_modalities"] == []
    assert {len(row["fused"]) for row in features.values()} == {384 + 1280 + 384 + DIMENSION}

    errors = pq.read_table(output / "errors").to_pylist()
    assert [(e["id"], e["modality"], e["stage"], e["error_type"]) for e in errors] == [
        ("s3", "sensor", "decode", "bad_readings")
    ]
    summary = json.loads((output / "_run.json").read_text())
    assert summary["reconciles"] is True
    assert summary["modalities"]["sensor"] == {
        "present": 3,
        "embedded": 2,
        "shared": 0,
        "kept": 0,
        "failed": 1,
        "absent": 1,
        "runtime": "torch",  # it declares no other
        "fallback": None,
    }
    assert summary["models"]["sensor"]["dimension"] == DIMENSION
    assert summary["models"]["sensor"]["preprocessing"] == {"readings": READINGS, "padding": "zeros"}


def test_the_registry_refuses_a_modality_the_contracts_lack(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered modality without its contract columns would have its values dropped by the
    sink: the registry refuses to load instead."""
    import mmfeatures.modalities as registry
    from mmfeatures.schema import load_contract

    registry._check_contracts()  # the real contracts and registry agree
    features = copy.deepcopy(load_contract("features"))
    features["fields"] = [field for field in features["fields"] if field["name"] != "has_audio"]
    for field in features["fields"]:
        if field["name"] == "image_embedding":
            del field["modality"]
    monkeypatch.setattr(registry, "load_contract", lambda name: features)
    monkeypatch.setattr(registry, "field_names", lambda name: [field["name"] for field in features["fields"]])
    with pytest.raises(ImportError, match=r"lacks has_audio, image_embedding \(an embedding of modality 'image'\)"):
        registry._check_contracts()

    monkeypatch.undo()
    monkeypatch.setattr(registry, "MODALITIES", {**registry.MODALITIES, "smell": registry.MODALITIES["text"]})
    with pytest.raises(ImportError, match="record contract's modality columns"):
        registry._check_contracts()
