"""The model handler: inside a real Beam pipeline (RunInference on the FnApiRunner), and called
directly for the retry path (one poison record fails alone), non-finite embeddings and empty
batches."""

from __future__ import annotations

import copy
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import apache_beam as beam
import cv2
import numpy as np
import pytest
import soundfile
import torch
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.util import assert_that, equal_to

from mmfeatures.encoders import mobilenet_v2
from mmfeatures.errors import EncodeError, Stage
from mmfeatures.host import CPU_TURNS
from mmfeatures.inference.batching import BatchByCost, CostBatcher, Keyed
from mmfeatures.inference.handler import EmbeddingModelHandler, Outcome
from mmfeatures.modalities.audio import AudioPreprocessor
from mmfeatures.modalities.base import Batch, Prepared, Preprocessor
from mmfeatures.modalities.image import IMAGE, ImageEncoder, ImagePreprocessor, MobileNetV2Encoder
from mmfeatures.modalities.text import TextEncoder, TextPreprocessor, tokenizer_for
from mmfeatures.settings import InferenceSettings
from tests.conftest import handler_for, keyed

TEXTS = {
    "short": "a photo of a cat",
    "medium": "the quick brown fox jumps over the lazy dog " * 3,
    "long": " ".join(f"token{i}" for i in range(400)),  # several 64-token windows for the tiny BERT
    "unicode": "ｆｕｌｌ width and café",
}


def poison_text(preprocessor: TextPreprocessor) -> Prepared:
    """A window whose ids are past the vocabulary: the embedding lookup raises IndexError."""
    vocab = tokenizer_for(preprocessor.model).vocab_size
    return Prepared([{"input_ids": np.array([101, vocab + 5, 102], np.int64)}], source="poison.txt")


def summary(outcome: Outcome) -> tuple[str, str | None, str | None, int | None]:
    vector = outcome.vector
    if vector is not None:
        assert vector.dtype == np.float32 and np.all(np.isfinite(vector))
    return (
        outcome.record.id,
        outcome.source,
        outcome.error.error_type if outcome.error is not None else None,
        None if vector is None else int(vector.shape[0]),
    )


def only_vector(outcomes: Iterable[Outcome]) -> np.ndarray:
    """The embedding of a one-record batch's outcome."""
    (outcome,) = outcomes
    assert outcome.vector is not None
    return outcome.vector


def run_pipeline(handler: EmbeddingModelHandler, items: list[Keyed], expected: list[tuple]) -> None:
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        batches = pipeline | beam.Create(items) | BatchByCost(handler.preprocessor, handler.settings)
        outcomes = batches | RunInference(handler) | beam.Map(summary)
        assert_that(outcomes, equal_to(expected))


# -- inside Beam ---------------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch_cost", [10**6, 8])  # 8 tokens: most records outweigh the cap alone
def test_text_records_in_a_beam_pipeline_give_one_outcome_each(
    tiny_text: TextPreprocessor, prepared, max_batch_cost: int
) -> None:
    items = [
        keyed(key, Prepared(prepared(tiny_text, text).windows, source=f"{key}.txt")) for key, text in TEXTS.items()
    ]
    items += [keyed("poison", poison_text(tiny_text)), keyed("no text", None)]
    expected: list[tuple] = [(key, f"{key}.txt", None, 32) for key in TEXTS]
    expected += [("poison", "poison.txt", "model_error", None), ("no text", None, None, None)]
    run_pipeline(handler_for(tiny_text, max_batch_cost=max_batch_cost), items, expected)


def _png(seed: int, shape: tuple[int, int]) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    return cv2.imencode(".png", image)[1].tobytes()


def _wav(seconds: float, rate: int) -> bytes:
    buffer = io.BytesIO()
    samples = np.random.default_rng(int(seconds * 10)).normal(0, 0.1, int(seconds * rate)).astype(np.float32)
    soundfile.write(buffer, samples, rate, format="WAV")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_image_and_audio_records_in_a_beam_pipeline(
    kind: str, tiny_vit_dir: Path, tiny_whisper_dir: Path, prepared
) -> None:
    preprocessor: Preprocessor
    if kind == "image":
        preprocessor = ImagePreprocessor(model=str(tiny_vit_dir))
        payloads = [_png(0, (40, 60)), _png(1, (90, 30)), _png(2, (32, 32))]
    else:
        preprocessor = AudioPreprocessor(model=str(tiny_whisper_dir))
        payloads = [_wav(0.5, 16000), _wav(2.0, 8000), _wav(1.2, 44100)]
    items = [keyed(f"{kind}{i}", prepared(preprocessor, payload)) for i, payload in enumerate(payloads)]
    expected = [(f"{kind}{i}", None, None, 32) for i in range(len(payloads))]
    run_pipeline(handler_for(preprocessor, max_batch_cost=10**9), items, expected)


# -- called directly -----------------------------------------------------------------------------
def test_a_poison_record_fails_alone_and_the_others_are_embedded(
    tiny_text: TextPreprocessor, tiny_text_encoder: TextEncoder, prepared
) -> None:
    handler = handler_for(tiny_text, max_batch_cost=10**9)
    embedder = handler.embedder(tiny_text_encoder)
    good = {key: prepared(tiny_text, text) for key, text in TEXTS.items()}
    alone = {key: only_vector(handler.run_inference([keyed(key, p)], embedder)) for key, p in good.items()}

    batch = [keyed("short", good["short"]), keyed("poison", poison_text(tiny_text)), keyed("long", good["long"])]
    outcomes = list(handler.run_inference(batch, embedder))

    assert [o.record.id for o in outcomes] == ["short", "poison", "long"]
    poison = outcomes[1]
    assert poison.vector is None
    assert isinstance(poison.error, EncodeError)
    assert poison.error.error_type == "model_error"
    assert poison.error.stage == Stage.ENCODE
    assert "IndexError" in str(poison.error)
    assert poison.source == "poison.txt"
    for outcome in (outcomes[0], outcomes[2]):
        assert outcome.error is None and outcome.vector is not None
        np.testing.assert_allclose(outcome.vector, alone[outcome.record.id], atol=1e-5)


def test_a_batch_of_one_poison_record_gives_one_error(tiny_text: TextPreprocessor, tiny_text_encoder) -> None:
    handler = handler_for(tiny_text, max_batch_cost=10**9)
    (outcome,) = handler.run_inference([keyed("p", poison_text(tiny_text))], handler.embedder(tiny_text_encoder))
    assert outcome.error is not None and outcome.error.error_type == "model_error"


def test_a_non_finite_embedding_is_an_error_not_a_feature(
    tiny_text: TextPreprocessor, tiny_text_encoder: TextEncoder, prepared
) -> None:
    """A model whose embedding row for one word is NaN: records holding that word fail alone."""
    (word_id,) = tokenizer_for(tiny_text.model)("zebra", add_special_tokens=False)["input_ids"]
    broken = copy.deepcopy(tiny_text_encoder)
    word_embeddings = broken.model.get_submodule("embeddings.word_embeddings")
    assert isinstance(word_embeddings, torch.nn.Embedding)
    with torch.no_grad():
        word_embeddings.weight[word_id] = float("nan")

    handler = handler_for(tiny_text, max_batch_cost=10**9)
    batch = [
        keyed("clean", prepared(tiny_text, "a photo of a cat")),
        keyed("nan", prepared(tiny_text, "a photo of a zebra")),
        keyed("also clean", prepared(tiny_text, "quarterly tax report")),
    ]
    outcomes = list(handler.run_inference(batch, handler.embedder(broken)))
    assert [summary(o)[2] for o in outcomes] == [None, "non_finite_embedding", None]
    assert outcomes[1].vector is None
    assert outcomes[1].error is not None and outcomes[1].error.stage == Stage.ENCODE
    clean = only_vector(handler.run_inference(batch[:1], handler.embedder(tiny_text_encoder)))
    assert outcomes[0].vector is not None
    np.testing.assert_allclose(outcomes[0].vector, clean, atol=1e-5)


def test_an_infinite_embedding_is_an_error_too(tiny_vit_dir: Path, prepared) -> None:
    preprocessor = ImagePreprocessor(model=str(tiny_vit_dir))
    encoder = IMAGE.load_encoder(preprocessor, "cpu")
    assert isinstance(encoder, ImageEncoder)
    pooler = encoder.model.get_submodule("pooler")
    dense = pooler.get_submodule("dense")
    assert isinstance(dense, torch.nn.Linear) and dense.bias is not None
    with torch.no_grad():
        dense.bias[0] = float("inf")
        pooler.activation = torch.nn.Identity()  # keep the Inf past the tanh
    handler = handler_for(preprocessor, max_batch_cost=10**9)
    (outcome,) = handler.run_inference(
        [keyed("img", prepared(preprocessor, _png(3, (32, 32))))], handler.embedder(encoder)
    )
    assert outcome.error is not None and outcome.error.error_type == "non_finite_embedding"


def test_an_empty_batch_gives_no_outcomes(tiny_text: TextPreprocessor, tiny_text_encoder) -> None:
    handler = handler_for(tiny_text, max_batch_cost=10**9)
    assert list(handler.run_inference([], handler.embedder(tiny_text_encoder))) == []


def test_multi_window_records_are_mean_pooled(tiny_text: TextPreprocessor, tiny_text_encoder, prepared) -> None:
    handler = handler_for(tiny_text, max_batch_cost=10**9)
    embedder = handler.embedder(tiny_text_encoder)
    record = prepared(tiny_text, TEXTS["long"])
    assert len(record.windows) > 1
    (outcome,) = handler.run_inference([keyed("long", record)], embedder)
    per_window = [
        only_vector(handler.run_inference([keyed(str(i), Prepared([window]))], embedder))
        for i, window in enumerate(record.windows)
    ]
    assert outcome.vector is not None
    np.testing.assert_allclose(outcome.vector, np.mean(per_window, axis=0), atol=1e-5)


def test_load_model_gives_a_frozen_model_and_sets_the_threads_once(tiny_bert_dir: Path) -> None:
    before = torch.get_num_threads()
    try:
        handler = handler_for(TextPreprocessor(model=str(tiny_bert_dir)), max_batch_cost=100, threads=1)
        embedder = handler.load_model()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    encoder = embedder.encoder  # loaded with the first use, by the handler's modality
    assert isinstance(encoder, TextEncoder)
    model = encoder.model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_a_loaded_convolutional_model_has_its_batch_norms_folded_and_gives_the_same_embeddings(
    image_default: ImagePreprocessor, prepared
) -> None:
    """The handler's encoder (``IMAGE.load_encoder``) runs the network folded and channels-last
    (``optimize_convolutions``); the network as published, batch norms and all, gives the same
    embeddings."""
    handler = handler_for(image_default, max_batch_cost=10**9, micro_batch_size=4)
    embedder = handler.load_model()
    rng = np.random.default_rng(0)
    photos = [cv2.imencode(".jpg", rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))[1].tobytes() for _ in range(5)]
    records = [prepared(image_default, photo) for photo in photos]
    published = mobilenet_v2.load_mobilenet_v2(image_default.resolved.weight_files[0])  # not optimized
    plain_encoder = MobileNetV2Encoder(published, mobilenet_v2.FEATURE_DIM)

    optimized = embedder.embed(records)
    as_published = handler.embedder(plain_encoder).embed(records)  # an encoder given is run as it is

    loaded_encoder = embedder.encoder
    assert isinstance(loaded_encoder, MobileNetV2Encoder)
    loaded = loaded_encoder.model
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in loaded.modules())
    assert any(isinstance(module, torch.nn.BatchNorm2d) for module in published.modules())
    convolutions = [module for module in loaded.modules() if isinstance(module, torch.nn.Conv2d)]
    assert convolutions and all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convolutions)
    for fast, plain in zip(optimized, as_published, strict=True):
        assert np.linalg.norm(fast - plain) <= 1e-5 * np.linalg.norm(plain)


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without a GPU")
def test_asking_for_cuda_without_a_gpu_fails_clearly(tiny_bert_dir: Path) -> None:
    handler = handler_for(TextPreprocessor(model=str(tiny_bert_dir)), device="cuda", max_batch_cost=100)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        handler.load_model()


def test_an_unknown_precision_is_refused(tiny_text: TextPreprocessor) -> None:
    with pytest.raises(ValueError, match="precision"):
        handler_for(tiny_text, max_batch_cost=100, precision="fp8")
    with pytest.raises(ValueError, match="precision"):
        InferenceSettings(precision="fp8")


def test_bf16_autocast_gives_nearly_the_fp32_embedding(
    tiny_text: TextPreprocessor, tiny_text_encoder, prepared
) -> None:
    batch = [keyed(key, prepared(tiny_text, text)) for key, text in TEXTS.items()]
    fp32 = handler_for(tiny_text, max_batch_cost=10**9)
    full = fp32.run_inference(batch, fp32.embedder(tiny_text_encoder))
    bf16 = handler_for(tiny_text, max_batch_cost=10**9, precision="bf16")
    half = bf16.run_inference(batch, bf16.embedder(tiny_text_encoder))
    for exact, approximate in zip(full, half, strict=True):
        a, b = exact.vector, approximate.vector
        assert a is not None and b is not None
        assert b.dtype == np.float32
        assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99


# -- batching ------------------------------------------------------------------------------------
def inputs(batch: list[Keyed]) -> list[Prepared]:
    """A batch's model inputs (every record of these batches has one)."""
    prepared = [p for _, p in batch if p is not None]
    assert len(prepared) == len(batch)
    return prepared


def _text_of_tokens(tokens: int) -> Prepared:
    """A one-window text record of ``tokens`` tokens (its cost)."""
    return Prepared([{"input_ids": np.ones(tokens, dtype=np.int64)}])


def test_batches_hold_one_length_bucket_in_whole_micro_batches(tiny_text: TextPreprocessor) -> None:
    """Short and long records interleaved: each batch is one padded length, cut at whole
    micro-batches of 4 once it holds 100 tokens; the rest waits for the next batch or the flush."""
    settings = InferenceSettings(max_batch_cost=100, micro_batch_size=4, micro_batches_per_batch=8)
    batcher = CostBatcher(tiny_text, settings)
    records = [keyed(f"r{i}", _text_of_tokens(5 if i % 2 else 30)) for i in range(40)]
    batches = [batch for item in records for batch in batcher.add(item)]
    flushed = list(batcher.flush())

    assert all(len({tiny_text.padded_length(p.windows[0]) for p in inputs(batch)}) == 1 for batch in batches + flushed)
    assert batches and all(len(batch) % 4 == 0 and sum(p.cost for p in inputs(batch)) >= 100 for batch in batches)
    assert sorted(r.id for batch in batches + flushed for r, _ in batch) == sorted(r.id for r, _ in records)


def test_short_records_go_out_once_they_fill_the_micro_batches_of_a_batch(tiny_text: TextPreprocessor) -> None:
    """One-token records under a cap that 10,000 of them would reach: a batch goes out at
    ``micro_batches_per_batch`` full micro-batches instead, so the model does not wait for them."""
    settings = InferenceSettings(max_batch_cost=10_000, micro_batch_size=4, micro_batches_per_batch=3)
    batcher = CostBatcher(tiny_text, settings)
    batches = [batch for i in range(100) for batch in batcher.add(keyed(f"r{i}", _text_of_tokens(1)))]
    assert [len(batch) for batch in batches] == [12] * (100 // 12)


@pytest.mark.parametrize(
    ("modality_name", "device", "micro_batches"),
    [
        ("image", "cpu", 16),
        ("text", "cpu", 8),
        ("audio", "cpu", 8),
        ("image", "cuda", 8),
        ("text", "cuda:1", 8),
    ],
)
def test_the_handler_batches_by_its_device_and_modality(
    modality_name: str, device: str, micro_batches: int, request: pytest.FixtureRequest
) -> None:
    """On a CPU each batch is one turn of the model at the cores, and a turn costs something of its
    own where preparing is heavy (images); a GPU gains nothing from more passes a batch. The batcher
    in front of a handler is built from the same preprocessor and settings (see ``EmbedModality``)."""
    preprocessor = request.getfixturevalue(f"{modality_name}_default")
    handler = handler_for(preprocessor, max_batch_cost=10_000, micro_batch_size=4, device=device)
    batcher = CostBatcher(handler.preprocessor, handler.settings)
    assert (batcher.preprocessor, batcher.max_batch_cost, batcher.micro_batch_size) == (preprocessor, 10_000, 4)
    assert batcher.micro_batches_per_batch == micro_batches


def test_buffered_records_stay_bounded_by_the_batch_cost(tiny_text: TextPreprocessor) -> None:
    """Many length buckets that never fill alone: the fullest goes out early, so what is held never
    passes the preprocessor's buffered_batches batches' worth, however long the input."""
    batcher = CostBatcher(
        tiny_text, InferenceSettings(max_batch_cost=64, micro_batch_size=8, micro_batches_per_batch=8)
    )
    held = 0
    for i in range(2000):
        record = _text_of_tokens(1 + i % 60)
        held += record.cost
        for batch in batcher.add(keyed(f"r{i}", record)):
            held -= sum(p.cost for p in inputs(batch))
        assert held <= tiny_text.buffered_batches * 64
    assert sum(p.cost for batch in batcher.flush() for p in inputs(batch)) == held


def test_a_record_costs_its_input_values(tiny_text: TextPreprocessor, prepared) -> None:
    handler = handler_for(tiny_text, max_batch_cost=1234)
    record = prepared(tiny_text, TEXTS["long"])
    assert record.cost == sum(len(w["input_ids"]) for w in record.windows)
    assert handler.get_num_bytes([keyed("a", record), keyed("b", record)]) == 2 * record.cost * 4
    assert handler.get_metrics_namespace() == "mmfeatures.text"


def _rounded(vector: np.ndarray | None) -> list[float]:
    assert vector is not None
    return vector.round(5).tolist()


def test_a_model_shared_across_processes_gives_the_same_embeddings(tiny_vit_dir: Path, prepared) -> None:
    """``model_copies``: the model runs in a process of its own, behind Beam's proxy."""
    preprocessor = ImagePreprocessor(model=str(tiny_vit_dir))
    items = [keyed(f"image{i}", prepared(preprocessor, _png(i, (40, 40)))) for i in range(3)]
    local = handler_for(preprocessor, max_batch_cost=10**9)
    expected = {o.record.id: o.vector for o in local.run_inference(items, local.load_model())}
    shared = handler_for(preprocessor, max_batch_cost=10**9, model_copies=1)
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        batches = pipeline | beam.Create(items) | BatchByCost(shared.preprocessor, shared.settings)
        outcomes = batches | RunInference(shared)
        assert_that(
            outcomes | beam.Map(lambda o: (o.record.id, _rounded(o.vector))),
            equal_to([(key, _rounded(vector)) for key, vector in expected.items()]),
        )


def test_on_a_cpu_batches_are_stacked_before_the_models_turn(
    tiny_text: TextPreprocessor, tiny_text_encoder: TextEncoder, prepared, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stacking is a copy on one core: done in the model's turn, it would keep the preparing
    threads off the other core."""
    turns: list[bool] = []
    collate = tiny_text_encoder.collate

    def collate_noting_the_turn(*args: Any) -> Batch:
        turns.append(CPU_TURNS._models_running > 0)
        return collate(*args)

    monkeypatch.setattr(tiny_text_encoder, "collate", collate_noting_the_turn)
    handler = handler_for(tiny_text, max_batch_cost=10**9, micro_batch_size=2)
    items = [keyed(text, prepared(tiny_text, text)) for text in TEXTS.values()]
    outcomes = handler.run_inference(items, handler.embedder(tiny_text_encoder))
    assert [o.error for o in outcomes] == [None] * len(items)
    assert turns and not any(turns)


def test_a_preprocessor_of_another_modality_is_refused(text_default: TextPreprocessor) -> None:
    with pytest.raises(TypeError, match="a TextPreprocessor cannot feed the image encoder"):
        EmbeddingModelHandler(IMAGE, text_default, InferenceSettings())
