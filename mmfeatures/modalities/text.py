"""Text: Unicode NFKC, whitespace collapsed, the model's tokenizer; text longer than the model's
window becomes several windows whose embeddings are mean-pooled. Any Hugging Face encoder works;
the default is sentence-transformers/all-MiniLM-L6-v2 with mean pooling (384-d)."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from mmfeatures.encoders.models import pretrained_kwargs
from mmfeatures.errors import DecodeError
from mmfeatures.modalities.base import Modality, Window, round_up

_WHITESPACE = re.compile(r"\s+")
PAD_MULTIPLE = 16  # tokens


def normalize_text(text: str) -> str:
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


class TextModality(Modality):
    name = "text"
    inline = True
    default_batch_cost = 8192  # tokens
    # One call of a fast tokenizer encodes a list of texts in parallel and without the GIL: 64 at
    # a time, four preparing threads decoded and tokenized 11,000 to 12,500 texts a second on 2
    # cores, against 5,500 to 7,000 one at a time (each call holds the GIL).
    preprocess_batch_size = 64

    _tokenizer: Any = None
    _window: int = 0

    def setup(self) -> None:
        if self._tokenizer is not None:
            return
        directory = self.resolved.directory
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        if not tokenizer.is_fast:  # its windows of overflowing tokens, and batched calls, need one
            raise ValueError(f"text model {self.model_reference!r} has no fast tokenizer (tokenizer.json)")
        self._tokenizer = tokenizer
        self._window = _window_length(directory, tokenizer)

    def __getstate__(self) -> dict[str, Any]:
        # Workers rebuild the tokenizer in setup() rather than unpickling one.
        return {k: v for k, v in self.__dict__.items() if k not in ("_tokenizer", "_window")}

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
        if len(payload) > self.limits.max_text_chars:
            raise DecodeError(
                f"text of {len(payload)} characters is over the {self.limits.max_text_chars} limit",
                error_type="text_too_long",
            )
        text = normalize_text(payload)
        if not text:
            raise DecodeError("the text is empty", error_type="empty_text")
        return text

    def preprocess(self, raw: str) -> list[Window]:
        return self.preprocess_batch([raw])[0]

    def preprocess_batch(self, raws: list[str]) -> list[list[Window]]:
        """Each text's token windows: the model's window length at most, the overflow of a long
        text in further windows."""
        self.setup()
        encoded = self._tokenizer(
            raws,
            truncation=True,
            max_length=self._window,
            return_overflowing_tokens=True,
            return_attention_mask=False,
        )
        windows: list[list[Window]] = [[] for _ in raws]
        for text, ids in zip(encoded["overflow_to_sample_mapping"], encoded["input_ids"]):
            windows[text].append({"input_ids": np.asarray(ids, dtype=np.int64)})
        return windows

    def settings(self) -> dict[str, Any]:
        self.setup()
        return {
            "normalization": "NFKC, whitespace collapsed",
            "max_tokens_per_window": self._window,
            "pooling": "mean over tokens, then over windows",
        }

    def dimension(self) -> int:
        return AutoConfig.from_pretrained(self.resolved.directory).hidden_size

    def load_model(self, device: str) -> torch.nn.Module:
        model = AutoModel.from_pretrained(self.resolved.directory, **pretrained_kwargs())
        return model.eval().requires_grad_(False).to(device)

    def padded_length(self, window: Window) -> int:
        self.setup()
        return round_up(len(window["input_ids"]), PAD_MULTIPLE, self._window)

    def collate(self, windows: list[Window], length: int = 0) -> dict[str, torch.Tensor]:
        self.setup()
        longest = max([length] + [len(w["input_ids"]) for w in windows])
        input_ids = np.full((len(windows), longest), self._tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(windows), longest), dtype=np.int64)
        for row, window in enumerate(windows):
            length = len(window["input_ids"])
            input_ids[row, :length] = window["input_ids"]
            attention_mask[row, :length] = 1
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}

    def encode(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _window_length(directory: str, tokenizer: Any) -> int:
    """The model's token window: sentence-transformers' max_seq_length when the folder has one,
    else the tokenizer's limit capped by the model's position table."""
    config = AutoConfig.from_pretrained(directory)
    limit = getattr(config, "max_position_embeddings", None) or 512
    st_config = os.path.join(directory, "sentence_bert_config.json")
    if os.path.isfile(st_config):
        with open(st_config, encoding="utf-8") as handle:
            limit = min(limit, int(json.load(handle).get("max_seq_length", limit)))
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 100_000:
        limit = min(limit, model_max)
    return limit
