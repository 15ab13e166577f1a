"""Text modality: normalisation, decode errors, windowing and the embeddings of the default
MiniLM and of a tiny random BERT loaded from a ``save_pretrained`` folder."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmfeatures.encoders.weights import DEFAULT
from mmfeatures.errors import DecodeError, Stage
from mmfeatures.limits import Limits
from mmfeatures.modalities.base import Prepared, Window
from mmfeatures.modalities.text import (
    MINILM_DIMENSION,
    MINILM_PAD_TOKEN_ID,
    MINILM_WINDOW,
    TEXT,
    TextEncoder,
    TextPreprocessor,
    _window_length,
    normalize_text,
    tokenizer_for,
)
from tests.conftest import forward, prepare

LONG_TEXT = " ".join(f"word{i % 97} example{i % 13}" for i in range(500))  # 1000 words


# -- normalisation and decode ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  hello \t\n  world  ", "hello world"),
        ("ｆｕｌｌ\u3000ｗｉｄｔｈ", "full width"),  # full-width letters and ideographic space
        ("\ufb01ne caf\u0065\u0301", "fine caf\u00e9"),  # ligature split, e + combining acute composed
        ("x\u00a0y\u2003z", "x y z"),  # no-break and em spaces
        ("①②", "12"),
        ("line1\r\nline2\x0bline3", "line1 line2 line3"),
    ],
)
def test_normalize_text_applies_nfkc_and_collapses_whitespace(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


@given(st.text())
@settings(max_examples=200, deadline=None)
def test_normalize_text_is_idempotent_and_trimmed(raw: str) -> None:
    once = normalize_text(raw)
    assert normalize_text(once) == once
    assert once == once.strip()
    assert "  " not in once


def test_decode_accepts_utf8_bytes_and_str() -> None:
    preprocessor = TextPreprocessor()
    assert preprocessor.decode("Caf\u00e9  au   lait".encode()) == "Caf\u00e9 au lait"
    assert preprocessor.decode(" Caf\u00e9 ") == "Caf\u00e9"


@pytest.mark.parametrize("payload", ["", "   \n\t ", b"", "\u3000\u00a0".encode()])
def test_empty_text_is_a_decode_error(payload: bytes | str) -> None:
    with pytest.raises(DecodeError) as caught:
        TextPreprocessor().decode(payload)
    assert caught.value.error_type == "empty_text"
    assert caught.value.stage == Stage.DECODE


@pytest.mark.parametrize("payload", [b"\xff\xfe bad", b"ok then \xc3\x28", b"\xed\xa0\x80"])
def test_invalid_utf8_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError) as caught:
        TextPreprocessor().decode(payload)
    assert caught.value.error_type == "invalid_utf8"


def test_text_over_the_character_limit_is_refused() -> None:
    preprocessor = TextPreprocessor(limits=Limits(max_text_chars=10))
    assert preprocessor.decode("x" * 10) == "x" * 10
    with pytest.raises(DecodeError) as caught:
        preprocessor.decode("x" * 11)
    assert caught.value.error_type == "text_too_long"


@pytest.mark.parametrize(
    ("character", "expansion"),
    [
        ("\ufdfa", 18),  # ARABIC LIGATURE SALLALLAHOU ALAYHE WASALLAM
        ("\ufb03", 3),  # LATIN SMALL LIGATURE FFI
        ("\u3392", 3),  # SQUARE MHZ
        ("\u2474", 3),  # PARENTHESIZED DIGIT ONE
        ("\u01c4", 2),  # LATIN CAPITAL LETTER DZ WITH CARON
    ],
)
def test_the_character_limit_applies_to_the_normalised_text(character: str, expansion: int) -> None:
    """NFKC expands these characters: the limit counts what the model reads, not what was sent."""
    preprocessor = TextPreprocessor(limits=Limits(max_text_chars=4 * expansion))
    assert len(preprocessor.decode(character * 4)) == 4 * expansion  # exactly at the limit once normalised
    for payload in (character * 5, "x" + character * 4):  # within the limit as sent, past it once normalised
        with pytest.raises(DecodeError) as caught:
            preprocessor.decode(payload)
        assert caught.value.error_type == "text_too_long"
        assert caught.value.stage == Stage.DECODE
        assert "normalised" in str(caught.value)


@pytest.mark.parametrize(
    "payload",
    [
        "\u200b",  # zero-width space
        "\u200d",  # zero-width joiner
        "\ufeff",  # byte order mark
        "\u200b\u200c\u200d\u2060\ufeff",  # all the zero-width ones
        " \u200b \t\u200d\n\u3000\ufeff ",  # mixed with spaces
        "\u00ad\u00ad",  # soft hyphens
        "\u200e\u200f\u202e\u2066\u2069",  # bidirectional marks and controls
        "\u2062\u2063",  # invisible times and separator
        "\U000e0001\U000e0041\U000e007f",  # tag characters
        "\ufe0f\u034f",  # a variation selector and the combining grapheme joiner, with nothing to join
        "\u3164 \uffa0",  # Hangul fillers
        "\x00\x07\x1b",  # control characters
        "\ufeff\u200b".encode(),
    ],
)
def test_text_of_invisible_characters_only_is_empty(payload: str | bytes) -> None:
    with pytest.raises(DecodeError) as caught:
        TextPreprocessor().decode(payload)
    assert caught.value.error_type == "empty_text"
    assert caught.value.stage == Stage.DECODE


@pytest.mark.parametrize(
    "payload",
    [
        "zero\u200bwidth",
        "\ufeffa text file that starts with a byte order mark",
        "a coder \U0001f469\u200d\U0001f4bb at work",  # an emoji sequence joined by ZWJ
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian: the ZWNJ is part of the word
        "co\u00adoperate",
        "\u200b x \u200b",
    ],
)
def test_text_with_invisible_characters_among_visible_ones_is_embedded(
    text_default: TextPreprocessor, payload: str
) -> None:
    assert text_default.decode(payload) == normalize_text(payload)
    windows = prepare(text_default, payload).windows
    assert len(windows) == 1 and len(windows[0]["input_ids"]) > 2  # more than [CLS] and [SEP]


# -- windows -------------------------------------------------------------------------------------
def test_short_text_is_one_window_with_special_tokens(text_default: TextPreprocessor) -> None:
    windows = text_default.preprocess("a photo of a cat")
    assert len(windows) == 1
    ids = windows[0]["input_ids"]
    assert ids.dtype == np.int64
    tokenizer = tokenizer_for(text_default.model)
    assert ids[0] == tokenizer.cls_token_id
    assert ids[-1] == tokenizer.sep_token_id


def test_long_text_is_split_into_windows_of_at_most_256_tokens(text_default: TextPreprocessor) -> None:
    assert text_default.settings()["max_tokens_per_window"] == text_default.window == 256
    windows = text_default.preprocess(text_default.decode(LONG_TEXT))
    lengths = [len(w["input_ids"]) for w in windows]
    assert len(windows) > 1
    assert max(lengths) <= 256
    assert all(length == 256 for length in lengths[:-1])
    # No token is lost or repeated: the windows' contents are the whole text's tokens.
    content = [int(t) for w in windows for t in w["input_ids"][1:-1]]
    assert content == tokenizer_for(text_default.model)(LONG_TEXT, add_special_tokens=False)["input_ids"]


def test_texts_tokenized_together_get_the_windows_each_gets_alone(text_default: TextPreprocessor) -> None:
    texts = [LONG_TEXT, "a photo of a cat", "ｆｕｌｌ width and café " * 40, "one", LONG_TEXT[:900]]
    together = text_default.preprocess_batch([text_default.decode(text) for text in texts])
    assert len(together) == len(texts)
    for text, windows in zip(texts, together, strict=True):
        alone = tokenizer_for(text_default.model)(
            text_default.decode(text), truncation=True, max_length=256, return_overflowing_tokens=True
        )["input_ids"]
        assert [window["input_ids"].tolist() for window in windows] == alone
    assert len(together[0]) > 1  # the long text overflowed into several windows


def test_prepared_cost_counts_tokens(text_default: TextPreprocessor) -> None:
    windows = text_default.preprocess(LONG_TEXT)
    assert Prepared(windows).cost == sum(len(w["input_ids"]) for w in windows)


def test_preprocessor_pickles_without_tokenizer_and_a_new_thread_loads_its_own(
    text_default: TextPreprocessor,
) -> None:
    """The tokenizer stays out of the pickle (it alone pickles to about 850 KB; the preprocessor
    to about 250 bytes), and a clone tokenizes identically in a thread that never held one, which
    loads its own."""
    data = pickle.dumps(text_default)
    assert len(data) < 10 * 1024
    clone = pickle.loads(data)
    assert (clone.model, clone.limits, clone.window, clone.pad_token_id) == (
        text_default.model,
        text_default.limits,
        text_default.window,
        text_default.pad_token_id,
    )

    def in_a_fresh_thread() -> tuple[list[Window], object]:
        return clone.preprocess("a photo of a cat"), tokenizer_for(clone.model)

    with ThreadPoolExecutor(max_workers=1) as fresh_thread:
        windows, its_tokenizer = fresh_thread.submit(in_a_fresh_thread).result()
    assert its_tokenizer is not tokenizer_for(text_default.model)  # loaded anew, not shared
    assert [w["input_ids"].tolist() for w in windows] == [
        w["input_ids"].tolist() for w in text_default.preprocess("a photo of a cat")
    ]


# -- default model -------------------------------------------------------------------------------
def test_default_model_gives_384_d_finite_semantic_embeddings(text_default, text_default_encoder, embed, cos) -> None:
    assert TEXT.dimension(text_default) == text_default_encoder.dimension == 384
    cat, kitten, tax = embed(
        text_default, text_default_encoder, ["a photo of a cat", "a picture of a kitten", "quarterly tax report"]
    )
    for vector in (cat, kitten, tax):
        assert vector.shape == (384,)
        assert vector.dtype == np.float32
        assert np.all(np.isfinite(vector))
    assert cos(cat, kitten) > cos(cat, tax) + 0.2
    assert cos(cat, kitten) > 0.5


def test_embedding_alone_equals_embedding_beside_a_longer_text(text_default, text_default_encoder, embed) -> None:
    (alone,) = embed(text_default, text_default_encoder, ["a photo of a cat"])
    batched = embed(text_default, text_default_encoder, [LONG_TEXT, "a photo of a cat", "tax"])
    np.testing.assert_allclose(batched[1], alone, atol=1e-5)


def test_long_text_embedding_is_the_mean_of_its_window_embeddings(text_default, text_default_encoder, embed) -> None:
    windows = text_default.preprocess(LONG_TEXT)
    per_window = forward(text_default_encoder, windows)
    assert per_window.shape == (len(windows), 384)
    (pooled,) = embed(text_default, text_default_encoder, [LONG_TEXT])
    np.testing.assert_allclose(pooled, per_window.mean(axis=0), atol=1e-5)


def test_describe_records_model_and_preprocessing(text_default: TextPreprocessor) -> None:
    description = TEXT.describe(text_default)
    assert description["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert description["dimension"] == 384
    assert len(description["weights_sha256"]) == 64
    assert description["preprocessing"]["max_tokens_per_window"] == 256


# -- a tiny random BERT from a save_pretrained folder -------------------------------------------
def test_tiny_bert_folder_runs_end_to_end(tiny_bert_dir: Path, embed) -> None:
    preprocessor = TextPreprocessor(model=str(tiny_bert_dir))
    assert preprocessor.resolved.bundled is False
    assert TEXT.dimension(preprocessor) == 32
    assert preprocessor.settings()["max_tokens_per_window"] == 64  # the model's position table

    windows = preprocessor.preprocess(preprocessor.decode(LONG_TEXT))
    assert len(windows) > 1
    assert max(len(w["input_ids"]) for w in windows) <= 64

    encoder = TEXT.load_encoder(preprocessor, "cpu")
    assert isinstance(encoder, TextEncoder)
    assert encoder.dimension == 32
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    batch = encoder.collate(windows[:3])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 64)
    assert forward(encoder, windows[:3]).shape == (3, 32)

    short, long = embed(preprocessor, encoder, ["hello world", LONG_TEXT])
    assert short.shape == long.shape == (32,)
    assert np.all(np.isfinite(short)) and np.all(np.isfinite(long))
    assert not np.allclose(short, long)


def test_collate_pads_with_the_pad_id_and_masks_padding(tiny_text: TextPreprocessor, tiny_text_encoder) -> None:
    windows = [{"input_ids": np.array([101, 7, 102])}, {"input_ids": np.array([101, 102])}]
    batch = tiny_text_encoder.collate(windows)
    pad = tokenizer_for(tiny_text.model).pad_token_id
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_the_bundled_model_settings_known_without_transformers_are_its_files() -> None:
    """The bundled MiniLM's window, pad token and size, resolved at launch without transformers,
    are what its tokenizer and configuration say."""
    from transformers import AutoConfig

    directory = TextPreprocessor().resolved.directory
    tokenizer = tokenizer_for(DEFAULT)
    assert (MINILM_WINDOW, MINILM_PAD_TOKEN_ID) == (_window_length(directory, tokenizer), tokenizer.pad_token_id)
    assert MINILM_DIMENSION == AutoConfig.from_pretrained(directory).hidden_size
