"""Whisper's encoder on short clips: any Whisper model's encoder (the bundled whisper-tiny.en
rebuilt from CTranslate2, or a Hugging Face Whisper folder), run without padding clips to 30 s."""

from __future__ import annotations

import torch
from transformers.models.whisper.modeling_whisper import WhisperEncoder


class WhisperClipEncoder(torch.nn.Module):
    """Mean-pooled Whisper encoder embedding of short clips, independent of batching.

    transformers' ``WhisperEncoder.forward`` only accepts 30 s (3000-frame) inputs, so
    a 1 s clip would cost 30 s of compute and attend to padding. This module runs the
    encoder's own submodules on the clip's frames only.

    Input contract:
      * ``input_features``: ``[batch, n_mels, T]`` log-mel features computed per clip
        (e.g. ``WhisperFeatureExtractor()(audio, sampling_rate=16000,
        padding="longest")``), not padded to 30 s, then right-padded to a common ``T``.
        ``T <= 2 * max_source_positions`` (3000 = 30 s for Whisper). Padding content is
        ignored: it is zeroed here, which is what a clip alone sees from conv1's own
        zero padding. Each encoder frame covers two mel frames (20 ms); an odd length
        works too and gets the ``(length + 1) / 2`` frames it would get alone.
      * ``frame_lengths``: ``[batch]`` number of real mel frames per clip, ``1..T``.

    Output: ``[batch, d_model]``, the final-layer-norm output averaged over the
    ``(length - 1) // 2 + 1`` encoder frames that hold real audio. Padding is removed
    at every step that mixes frames (conv1 output before conv2, attention keys,
    pooling), so a clip's embedding is the same alone or beside longer clips.
    Supports the ``eager`` and ``sdpa`` attention implementations, whose masks are
    additive ``[batch, 1, 1, frames]`` tensors.
    """

    def __init__(self, encoder: WhisperEncoder) -> None:
        super().__init__()
        attention = encoder.config._attn_implementation or "eager"
        if attention not in ("eager", "sdpa"):
            raise ValueError(f"attention implementation {attention!r} does not take an additive mask")
        self.encoder = encoder

    def forward(self, input_features: torch.Tensor, frame_lengths: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder
        batch, n_mels, n_frames = input_features.shape
        max_frames = 2 * encoder.config.max_source_positions
        if n_mels != encoder.config.num_mel_bins or n_frames > max_frames:
            raise ValueError(
                f"expected [batch, {encoder.config.num_mel_bins}, T <= {max_frames}] features, "
                f"got {tuple(input_features.shape)}"
            )
        if frame_lengths.shape != (batch,) or not bool(((frame_lengths >= 1) & (frame_lengths <= n_frames)).all()):
            raise ValueError(f"frame_lengths must be [batch] values in 1..{n_frames}, got {frame_lengths.tolist()}")

        padding_mel = torch.arange(n_frames, device=input_features.device) >= frame_lengths[:, None]
        padding_mel = padding_mel[:, None, :]
        hidden = input_features.masked_fill(padding_mel, 0.0)
        hidden = torch.nn.functional.gelu(encoder.conv1(hidden)).masked_fill(padding_mel, 0.0)
        hidden = torch.nn.functional.gelu(encoder.conv2(hidden)).transpose(1, 2)
        n_out = hidden.shape[1]
        hidden = hidden + encoder.embed_positions.weight[:n_out]
        hidden = torch.nn.functional.dropout(hidden, p=encoder.dropout, training=self.training)

        out_lengths = (frame_lengths - 1) // 2 + 1
        padding_out = torch.arange(n_out, device=hidden.device) >= out_lengths[:, None]
        attention_mask = torch.zeros(batch, 1, 1, n_out, dtype=hidden.dtype, device=hidden.device).masked_fill(
            padding_out[:, None, None, :], torch.finfo(hidden.dtype).min
        )
        for layer in encoder.layers:
            hidden = layer(hidden, attention_mask)
        hidden = encoder.layer_norm(hidden)

        pooled = hidden.masked_fill(padding_out[:, :, None], 0.0).sum(dim=1)
        return pooled / out_lengths[:, None].to(hidden.dtype)
