"""``--runtime onnx``: each image and text encoder exported once, cached by what shapes the export,
checked against torch before it is kept, and giving torch's embeddings within 1e-4."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from mmfeatures import storage
from mmfeatures.errors import ConfigurationError
from mmfeatures.incremental import settings_fingerprint
from mmfeatures.inference.onnx_runtime import OnnxEncoder, OnnxRuntime, export, export_key
from mmfeatures.job import Job
from mmfeatures.modalities import MODALITIES, Encoder, Preprocessor, Window
from mmfeatures.modalities.audio import AudioEncoder
from mmfeatures.modalities.base import Batch
from mmfeatures.modalities.image import ImagePreprocessor
from mmfeatures.modalities.text import TextPreprocessor
from mmfeatures.options import parse_options
from mmfeatures.settings import RUNTIMES
from tests.conftest import handler_for, keyed, prepare
from tests.jobs import extract, feature_rows, png, write_manifest

TEXTS = ["a cat", "a photo of a dog on a sofa " * 3, "word " * 120, "long text " * 400]  # several buckets


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test exports into a cache of its own."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def embeddings(preprocessor: Preprocessor, payloads: Sequence[bytes | str], runtime: str) -> np.ndarray:
    """The payloads embedded through the real model handler on ``runtime``, in one batch."""
    handler = handler_for(preprocessor, max_batch_cost=10**9, runtime=runtime)
    batch = [keyed(f"r{i}", prepare(preprocessor, payload)) for i, payload in enumerate(payloads)]
    outcomes = list(handler.run_inference(batch, handler.load_model()))
    assert all(outcome.error is None for outcome in outcomes), [outcome.error for outcome in outcomes]
    return np.stack([np.asarray(outcome.vector) for outcome in outcomes])


def images(count: int) -> list[bytes]:
    return [png(seed) for seed in range(count)]


@pytest.mark.parametrize(
    ("modality", "model"),
    [("image", "default"), ("text", "default"), ("image", "tiny_vit_dir"), ("text", "tiny_bert_dir")],
)
def test_onnx_embeddings_equal_torchs(modality: str, model: str, request: pytest.FixtureRequest, cache: Path) -> None:
    """The bundled models and Hugging Face ones, across micro-batches and length buckets."""
    reference = model if model == "default" else str(request.getfixturevalue(model))
    preprocessor = MODALITIES[modality].preprocessor(reference)
    payloads: list[bytes | str] = list(TEXTS) if modality == "text" else list(images(6))
    on_torch, on_onnx = (embeddings(preprocessor, payloads, runtime) for runtime in ("torch", "onnx"))
    assert np.abs(on_onnx - on_torch).max() < 1e-4
    assert len(list(cache.glob("*.onnx"))) == 1  # one export serves every batch size and length


def test_the_torch_model_goes_once_the_session_runs(tiny_text: TextPreprocessor) -> None:
    """The session holds the weights: a worker keeps one copy of them, not two."""
    handler = handler_for(tiny_text, max_batch_cost=10**9, runtime="onnx")
    embedder = handler.load_model()
    embedder.embed([prepare(tiny_text, text) for text in TEXTS[:2]])
    encoder = embedder.encoder
    assert isinstance(encoder, OnnxEncoder) and not hasattr(encoder.source, "model")
    np.testing.assert_array_equal(
        embedder.embed([prepare(tiny_text, TEXTS[0])]), embedder.embed([prepare(tiny_text, TEXTS[0])])
    )


def test_the_export_is_reused_and_a_changed_model_exports_again(
    tiny_bert_dir: Path, tiny_text: TextPreprocessor, cache: Path
) -> None:
    embeddings(tiny_text, TEXTS[:2], "onnx")
    (exported,) = cache.glob("*.onnx")
    written = exported.stat().st_mtime_ns
    again = embeddings(tiny_text, TEXTS[:2], "onnx")
    assert [path.stat().st_mtime_ns for path in cache.glob("*.onnx")] == [written]
    np.testing.assert_array_equal(again, embeddings(tiny_text, TEXTS[:2], "onnx"))
    encoder = MODALITIES["text"].load_encoder(tiny_text, "cpu")
    sha = tiny_text.resolved.weights_sha256()
    assert export_key(encoder, sha) == exported.stem
    assert export_key(encoder, "0" * 64) != exported.stem


class _BranchOnLength(Encoder[torch.Tensor]):
    """Sums its input's tokens, or their squares past eight tokens: a Python branch on a shape,
    which a trace freezes at its example's."""

    dimension = 1
    export_axes: ClassVar[dict[str, dict[int, str]] | None] = {"values": {0: "rows", 1: "tokens"}}

    def collate(self, windows: Sequence[Window], length: int = 0) -> Batch:
        return {"values": np.stack([window["values"] for window in windows])}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        values = batch["values"]
        return (values.sum(dim=1) if values.shape[1] > 8 else (values**2).sum(dim=1))[:, None]


def test_an_export_that_differs_from_torch_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "export.onnx"
    inputs = {"values": np.arange(2 * 12, dtype=np.float32).reshape(2, 12)}
    with pytest.raises(ValueError, match="differs from torch on inputs of shapes .*6"):
        export(_BranchOnLength(), inputs, str(path), OnnxRuntime("cpu").session)
    assert list(tmp_path.iterdir()) == []  # neither the export nor its temporary file


def test_an_encoder_whose_export_fails_runs_on_torch_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "export.onnx"
    encoder = OnnxEncoder(_BranchOnLength(), str(path), OnnxRuntime("cpu"))
    batch = {"values": np.arange(2 * 12, dtype=np.float32).reshape(2, 12)}
    on_torch = _BranchOnLength().forward({"values": torch.from_numpy(batch["values"])}).numpy()
    np.testing.assert_array_equal(encoder.forward(batch), on_torch)
    assert encoder.fallback is not None
    assert encoder.fallback.startswith("_BranchOnLength cannot run on ONNX Runtime: the ONNX export")
    assert list(tmp_path.iterdir()) == []
    # Tried once: the batches after it go to torch without exporting again.
    monkeypatch.setattr("mmfeatures.inference.onnx_runtime.export", _never)
    np.testing.assert_array_equal(encoder.forward(batch), on_torch)


def _never(*args: Any) -> None:
    raise AssertionError("exported again")


def test_an_encoder_with_no_export_runs_on_torch() -> None:
    class Unexported(_BranchOnLength):
        export_axes = None

    encoder = OnnxRuntime("cpu").compile(Unexported(), lambda: "0" * 64)
    assert OnnxRuntime("cpu").fallback(encoder) == "Unexported has no ONNX export"
    batch = {"values": np.ones((2, 3), dtype=np.float32)}
    np.testing.assert_array_equal(encoder.forward(batch), [[3.0], [3.0]])


def test_a_job_whose_models_do_not_export_embeds_them_on_torch_and_its_summary_says_so(
    corpus: dict[str, Any], tiny_model_options: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_manifest(corpus["folder"], corpus["rows"])
    on_torch = extract(manifest, str(tmp_path / "torch"), [*tiny_model_options, "--runtime", "torch"])

    def refused(encoder: Encoder[Any], *args: Any) -> None:
        raise ValueError(f"no exporter for {type(encoder).__name__}")

    monkeypatch.setattr("mmfeatures.inference.onnx_runtime.export", refused)
    summary = extract(manifest, str(tmp_path / "onnx"), [*tiny_model_options, "--runtime", "onnx"])
    assert summary["reconciles"] and summary["error_rows"] == 0
    for modality in ("text", "image"):
        counts = summary["modalities"][modality]
        encoder = f"{modality.title()}Encoder"
        assert counts["runtime"] == "onnx" and counts["embedded"] == len(corpus["rows"])  # copies included
        assert counts["fallback"] == {
            "runtime": "torch",
            "embedded": counts["embedded"],
            "reason": f"{encoder} cannot run on ONNX Runtime: no exporter for {encoder}",
        }
    assert summary["modalities"]["audio"]["fallback"] is None
    assert on_torch["modalities"]["text"]["fallback"] is None
    tables = {runtime: feature_rows(str(tmp_path / runtime)) for runtime in RUNTIMES}
    for record_id, row in tables["torch"].items():
        for column in ("text_embedding", "image_embedding", "fused"):
            np.testing.assert_array_equal(tables["onnx"][record_id][column], row[column])


def test_the_runtime_is_in_the_settings_fingerprint_and_the_recorded_options(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"id": "a", "text": "a cat"}\n')
    jobs = {
        runtime: Job.from_options(
            parse_options(["--input", str(manifest), "--output", str(tmp_path / "out"), "--runtime", runtime])
        )
        for runtime in ("torch", "onnx")
    }
    assert jobs["onnx"].options["runtime"] == "text=onnx,image=onnx,audio=torch"  # audio has no export
    assert jobs["torch"].options["runtime"] == "text=torch,image=torch,audio=torch"
    assert jobs["onnx"].fingerprint != jobs["torch"].fingerprint
    # A torch run's fingerprint is the one tables recorded before there was a choice of runtime.
    torch_job = jobs["torch"]
    assert torch_job.fingerprint == settings_fingerprint(
        torch_job.models, torch_job.fusion.describe(), "fp32", "cpu", {"image": "torch"}
    )


def _job(tmp_path: Path, *options: str) -> Job:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"id": "a", "text": "a cat"}\n')
    return Job.from_options(parse_options(["--input", str(manifest), "--output", str(tmp_path / "out"), *options]))


@pytest.mark.parametrize(
    ("options", "runtime"), [((), "onnx"), (("--precision", "bf16"), "torch"), (("--device", "cuda"), "torch")]
)
def test_the_default_runtime_is_onnx_on_a_cpu_at_fp32(tmp_path: Path, options: tuple[str, ...], runtime: str) -> None:
    assert _job(tmp_path, *options).options["runtime"] == f"text={runtime},image={runtime},audio=torch"


def test_without_onnxruntime_the_default_is_torch_and_onnx_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else find_spec(name))
    assert _job(tmp_path).options["runtime"] == "text=torch,image=torch,audio=torch"
    with pytest.raises(ConfigurationError, match=r"--runtime onnx needs onnxruntime: install mmfeatures\[cpu\]"):
        _job(tmp_path, "--runtime", "onnx")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_onnx_runs_fp32_only(tmp_path: Path, precision: str) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"id": "a", "text": "a cat"}\n')
    argv = ["--input", str(manifest), "--output", str(tmp_path / "out"), "--runtime", "onnx", "--precision", precision]
    with pytest.raises(ConfigurationError, match=f"--runtime onnx runs fp32 only: --precision {precision}"):
        Job.from_options(parse_options(argv))


def test_a_missing_execution_provider_is_a_clear_error() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(RuntimeError, match="needs onnxruntime's CUDAExecutionProvider"):
        OnnxRuntime("cuda").prepare_process(None)


def test_the_image_and_text_encoders_export_and_the_audio_ones_do_not(
    image_default: ImagePreprocessor, text_default: TextPreprocessor
) -> None:
    """What each modality declares it runs on (``Modality.runtimes``) is what its encoders can do."""
    loaded: dict[str, Any] = {
        "image": MODALITIES["image"].load_encoder(image_default, "cpu"),
        "text": MODALITIES["text"].load_encoder(text_default, "cpu"),
    }
    for name, encoder in loaded.items():
        assert encoder.export_axes is not None and "onnx" in MODALITIES[name].runtimes
    assert AudioEncoder.export_axes is None and MODALITIES["audio"].runtimes == ("torch",)


def test_a_job_on_onnx_gives_the_table_of_a_job_on_torch(corpus: dict[str, Any], tmp_path: Path) -> None:
    manifest = write_manifest(corpus["folder"], corpus["rows"])
    summaries = {runtime: extract(manifest, str(tmp_path / runtime), ["--runtime", runtime]) for runtime in RUNTIMES}
    assert summaries["onnx"]["options"]["runtime"] == "text=onnx,image=onnx,audio=torch"
    tables = {runtime: feature_rows(str(tmp_path / runtime)) for runtime in RUNTIMES}
    assert sorted(tables["onnx"]) == sorted(tables["torch"]) == sorted(row["id"] for row in corpus["rows"])
    for record_id, on_torch in tables["torch"].items():
        on_onnx = tables["onnx"][record_id]
        for column in ("text_embedding", "image_embedding", "fused"):
            assert np.abs(np.subtract(on_onnx[column], on_torch[column])).max() < 1e-4, (record_id, column)
