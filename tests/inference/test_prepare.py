"""The prepare step of ``EmbedModality``: records prepared in a pool of threads, a bounded number
ahead, leave in input order with their own timestamps and windows, failures as tagged error rows;
the pool threads share the preprocessor but each loads its own tokenizer; and the turns a CPU
model and the preparing threads take at the cores."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import time
from concurrent.futures.thread import BrokenThreadPool
from typing import Any

import cv2
import numpy as np
import pytest
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import IntervalWindow
from apache_beam.utils.windowed_value import WindowedValue

from mmfeatures import storage
from mmfeatures.errors import ERRORS_TAG, PreprocessError
from mmfeatures.host import CoreTurns
from mmfeatures.inference.prepare import CARRIED_FILES_AHEAD, Prepare
from mmfeatures.limits import Limits
from mmfeatures.modalities.image import ImagePreprocessor
from mmfeatures.modalities.text import TextPreprocessor, tokenizer_for
from mmfeatures.records import parse_record

AHEAD = 4


def _grouped(preprocessor: TextPreprocessor, size: int) -> TextPreprocessor:
    """A copy of ``preprocessor`` that takes ``size`` texts to a ``preprocess_batch`` call, as a
    subclass would declare it (the shared fixture keeps its own)."""
    grouped = copy.copy(preprocessor)
    grouped.__class__ = type("GroupedTextPreprocessor", (TextPreprocessor,), {"preprocess_batch_size": size})
    return grouped


def _run(prepare: Prepare, payloads: list[str] | list[bytes]) -> tuple[list[Any], int, int]:
    """Every output of one bundle over records holding ``payloads`` in the preprocessor's modality
    (record i at timestamp i, in window [i, i+1)), the most records the step held at once
    (grouping or in flight), and the most carried bytes it held in flight."""
    prepare.setup()
    prepare.start_bundle()
    outputs: list[Any] = []
    most_in_flight = most_bytes = 0
    for index, payload in enumerate(payloads):
        row = {"id": f"r{index}", prepare.preprocessor.name: payload}
        record = parse_record(row, source="m.jsonl", manifest_dir="")
        outputs += prepare.process(record, window=IntervalWindow(index, index + 1), timestamp=index)
        most_in_flight = max(most_in_flight, len(prepare._grouping) + prepare._records_in_flight)
        most_bytes = max(most_bytes, prepare._bytes_in_flight)
    outputs += prepare.finish_bundle()
    prepare.teardown()
    return outputs, most_in_flight, most_bytes


def test_records_leave_in_order_with_their_own_windows_a_bounded_number_ahead(tiny_text: TextPreprocessor) -> None:
    texts = [f"sentence number {index} " * (1 + index % 7) for index in range(60)]
    grouped = _grouped(tiny_text, 3)  # tokenized 3 at a time: many groups in flight
    outputs, most_in_flight, _ = _run(Prepare(grouped, storage.LocationPolicy(), ahead=AHEAD), texts)

    assert most_in_flight <= AHEAD + 3
    assert all(isinstance(output, WindowedValue) for output in outputs)
    assert [output.value[0].id for output in outputs] == [f"r{index}" for index in range(60)]
    assert [output.timestamp.micros // 10**6 for output in outputs] == list(range(60))
    assert [output.windows[0].start.micros // 10**6 for output in outputs] == list(range(60))
    for text, output in zip(texts, outputs, strict=True):  # the pool threads prepare as the preprocessor does here
        expected = tiny_text.preprocess(tiny_text.decode(text))
        windows = output.value[1].windows
        assert len(windows) == len(expected)
        for window, expected_window in zip(windows, expected, strict=True):
            assert window.keys() == expected_window.keys()
            assert all(np.array_equal(window[name], expected_window[name]) for name in window)


def test_media_bytes_that_records_carry_are_held_in_flight_to_a_few_files_worth(
    image_default: ImagePreprocessor,
) -> None:
    """However many records may be ahead, the bytes they carry (tar members) held in flight stay
    within ``CARRIED_FILES_AHEAD`` times --max-bytes, plus the group just submitted."""
    preprocessor = ImagePreprocessor(limits=Limits(max_bytes=1 << 20))
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    png = cv2.imencode(".png", noise)[1].tobytes()  # about 270 KB: incompressible
    outputs, most_in_flight, most_bytes = _run(Prepare(preprocessor, storage.LocationPolicy(), ahead=256), [png] * 40)
    assert [output.value[0].id for output in outputs] == [f"r{index}" for index in range(40)]
    assert most_bytes <= CARRIED_FILES_AHEAD * (1 << 20) + len(png)
    assert most_in_flight < 40  # the bytes held it back, not the records ahead


def test_a_record_that_fails_to_prepare_is_a_tagged_error_in_its_place(tiny_text: TextPreprocessor) -> None:
    outputs, *_ = _run(Prepare(tiny_text, storage.LocationPolicy(), ahead=AHEAD), ["fine", "   ", "also fine"])

    assert [type(output) for output in outputs] == [WindowedValue, TaggedOutput, WindowedValue, WindowedValue]
    error = outputs[1]
    assert error.tag == ERRORS_TAG
    assert error.value.timestamp.micros == 1_000_000
    assert (error.value.value["id"], error.value.value["error_type"]) == ("r1", "empty_text")
    failed, prepared = outputs[2].value  # the record goes on, the modality failed, in its place
    assert (failed.id, failed.failed, prepared, outputs[2].timestamp.micros) == ("r1", {"text"}, None, 1_000_000)


def test_a_record_without_the_modality_passes_on_at_once(tiny_text: TextPreprocessor) -> None:
    """It is not held behind the records in flight: the next modality's step gets it now."""
    prepare = Prepare(tiny_text, storage.LocationPolicy(), ahead=AHEAD)
    prepare.setup()
    prepare.start_bundle()
    window = IntervalWindow(0, 1)
    text = parse_record({"id": "t", "text": "words"}, source="m", manifest_dir="")
    assert list(prepare.process(text, window=window, timestamp=0)) == []
    image_only = parse_record({"id": "i", "image": "a.png"}, source="m", manifest_dir="")
    assert list(prepare.process(image_only, window=window, timestamp=0)) == [(image_only, None)]
    assert [output.value[0].id for output in prepare.finish_bundle()] == ["t"]
    prepare.teardown()


def test_records_are_preprocessed_in_groups_of_the_preprocessors_batch_size(
    tiny_text: TextPreprocessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    preprocess_batch = TextPreprocessor.preprocess_batch

    def recording(preprocessor: TextPreprocessor, raws: list[str]) -> Any:
        sizes.append(len(raws))
        return preprocess_batch(preprocessor, raws)

    monkeypatch.setattr(TextPreprocessor, "preprocess_batch", recording)
    grouped = _grouped(tiny_text, 4)
    outputs, *_ = _run(Prepare(grouped, storage.LocationPolicy(), ahead=AHEAD), [f"text {i}" for i in range(10)])

    assert [output.value[0].id for output in outputs] == [f"r{i}" for i in range(10)]
    assert sorted(sizes) == [2, 4, 4]  # groups run side by side; the bundle's end sends the partial one


def test_a_text_that_fails_in_a_batched_call_fails_alone(
    tiny_text: TextPreprocessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched call fails as a whole; each text is then tokenized on its own."""
    preprocess, preprocess_batch = TextPreprocessor.preprocess, TextPreprocessor.preprocess_batch

    def failing(preprocessor: TextPreprocessor, raw: str) -> Any:
        if "poison" in raw:
            raise PreprocessError("the tokenizer refused it", error_type="tokenizer_failed")
        return preprocess(preprocessor, raw)

    def failing_batch(preprocessor: TextPreprocessor, raws: list[str]) -> Any:
        if any("poison" in raw for raw in raws):
            raise PreprocessError("the tokenizer refused it", error_type="tokenizer_failed")
        return preprocess_batch(preprocessor, raws)

    monkeypatch.setattr(TextPreprocessor, "preprocess", failing)
    monkeypatch.setattr(TextPreprocessor, "preprocess_batch", failing_batch)
    texts = ["fine", "poison", "also fine", "fine again"]
    outputs, *_ = _run(Prepare(tiny_text, storage.LocationPolicy(), ahead=AHEAD), texts)

    assert [type(output) for output in outputs] == [WindowedValue, TaggedOutput, *[WindowedValue] * 3]
    assert (outputs[1].value.value["id"], outputs[1].value.value["error_type"]) == ("r1", "tokenizer_failed")
    assert outputs[2].value[1] is None and outputs[2].value[0].failed == {"text"}
    assert [len(output.value[1].windows) for i, output in enumerate(outputs) if i not in (1, 2)] == [1, 1, 1]


def test_each_pool_thread_uses_its_own_tokenizer(tiny_text: TextPreprocessor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokenizers hold buffers two threads must not share: the pool threads share the preprocessor,
    but each tokenizes with a tokenizer of its own (``tokenizer_for``), loaded once per thread, and
    none with the one the launching thread loaded."""
    used: list[tuple[int, Any]] = []  # (thread, tokenizer) per batched call; kept alive, so ids stay unique
    preprocess_batch = TextPreprocessor.preprocess_batch

    def recording(preprocessor: TextPreprocessor, raws: list[str]) -> Any:
        used.append((threading.get_ident(), tokenizer_for(preprocessor.model)))
        time.sleep(0.02)  # a group still running when the next is sent: the pool starts another thread
        return preprocess_batch(preprocessor, raws)

    monkeypatch.setattr(TextPreprocessor, "preprocess_batch", recording)
    texts = [f"sentence number {index}" for index in range(30)]
    outputs, *_ = _run(Prepare(_grouped(tiny_text, 3), storage.LocationPolicy(), ahead=AHEAD), texts)

    assert [output.value[0].id for output in outputs] == [f"r{index}" for index in range(30)]
    tokenizers = {thread: {id(tokenizer) for t, tokenizer in used if t == thread} for thread, _ in used}
    assert threading.get_ident() not in tokenizers  # all the tokenizing ran in the pool
    assert len(tokenizers) >= 2, tokenizers  # several pool threads took part
    assert all(len(ids) == 1 for ids in tokenizers.values())  # one tokenizer per thread, kept
    per_thread = [ids.pop() for ids in tokenizers.values()]
    assert len(set(per_thread)) == len(per_thread)  # no two threads share one
    assert id(tokenizer_for(tiny_text.model)) not in per_thread  # nor the launching thread's


def test_preparing_waits_while_a_cpu_model_runs() -> None:
    turns = CoreTurns()
    waited = threading.Event()

    def prepare() -> None:
        turns.wait_for_cores()
        waited.set()

    with turns.model_turn():
        thread = threading.Thread(target=prepare)
        thread.start()
        assert not waited.wait(0.3)  # blocked for as long as the model runs
    assert waited.wait(5)
    thread.join()
    turns.wait_for_cores()  # no model running: no wait at all


def test_a_settled_worker_leaves_its_loaded_modules_out_of_garbage_collection() -> None:
    """Run in a fresh interpreter: this one may be settled already."""
    code = (
        "import gc, torch, mmfeatures.host as host\n"
        "assert gc.get_freeze_count() == 0\n"
        "host.settle_worker_process(); frozen = gc.get_freeze_count()\n"
        "host.settle_worker_process()\n"
        "assert frozen > 100000 and gc.get_freeze_count() == frozen, frozen\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_model_whose_tools_cannot_load_fails_the_step_not_each_record(
    tiny_text: TextPreprocessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tokenizer that cannot be loaded on the worker is the worker's failure (Beam retries the
    bundle, then fails the job), never one error row per record that would let the run pass."""

    def unloadable(self: TextPreprocessor) -> None:
        raise OSError("tokenizer.json is missing")

    monkeypatch.setattr(TextPreprocessor, "load_tools", unloadable)
    with pytest.raises(BrokenThreadPool):
        _run(Prepare(tiny_text, storage.LocationPolicy(), ahead=AHEAD), ["a text", "another"])
