"""Where a model's weights come from, and the fingerprint the output records for them.

A model reference is one of:
- ``default``: the modality's bundled model, whose weights ship inside a pip package;
- a local folder in Hugging Face layout (``save_pretrained`` output);
- an fsspec URL of such a folder (gs://, s3://, ...), copied once into a local cache;
- a Hugging Face model id, fetched by huggingface_hub into its cache (``HF_HUB_OFFLINE=1`` reads
  that cache alone).
Only safetensors weights are loaded from folders and ids, and never with ``trust_remote_code``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from functools import cache
from importlib import util as import_util
from types import ModuleType
from typing import Any

from mmfeatures import storage

DEFAULT = "default"


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference pinned to local files."""

    model_id: str
    directory: str
    weight_files: tuple[str, ...]
    bundled: bool

    def weights_sha256(self) -> str:
        return _sha256_of_files(self.weight_files)


@dataclass(frozen=True)
class BundledModel:
    """A modality's default model, whose weights ship inside a pip package."""

    model_id: str
    package: str  # import name of the pip package that carries the weights
    subdirectory: str
    weight_names: tuple[str, ...]
    install_hint: str


@cache
def resolve_model(reference: str, bundled: BundledModel | None) -> ResolvedModel:
    """Pin ``reference`` to local files (cached for the life of the process); ``default`` names
    ``bundled``, the modality's own model."""
    if reference == DEFAULT:
        if bundled is None:
            raise ValueError("this modality has no bundled model: name a model folder or id")
        return _resolve_bundled(bundled)
    if storage.has_scheme(reference) and not reference.startswith("file://"):
        return _resolve_folder(reference, _copy_remote_folder(reference))
    local = reference.removeprefix("file://")
    if os.path.isdir(local):
        return _resolve_folder(reference, local)
    if local.startswith(("/", ".", "~")) or reference.startswith("file://"):
        raise FileNotFoundError(f"model folder {reference!r} does not exist")
    return _resolve_folder(reference, _hub_snapshot(reference))


def _resolve_bundled(bundled: BundledModel) -> ResolvedModel:
    spec = import_util.find_spec(bundled.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the bundled model {bundled.model_id} needs: {bundled.install_hint}")
    directory = os.path.join(list(spec.submodule_search_locations)[0], bundled.subdirectory)
    files = tuple(os.path.join(directory, name) for name in bundled.weight_names)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is missing; reinstall with: {bundled.install_hint}")
    return ResolvedModel(bundled.model_id, directory, files, bundled=True)


def _resolve_folder(model_id: str, directory: str) -> ResolvedModel:
    files = tuple(sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".safetensors")))
    if not files:
        raise FileNotFoundError(
            f"{model_id}: no .safetensors weights in {directory} (other weight formats are refused)"
        )
    return ResolvedModel(model_id, directory, files, bundled=False)


def _copy_remote_folder(url: str) -> str:
    """Copy a model folder from object storage once; later runs on this machine reuse it."""
    from fsspec.core import url_to_fs

    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = os.path.join(storage.cache_root(), "models", digest)
    if os.path.isdir(target):
        return target
    fs, path = url_to_fs(url)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(target))
    for remote in fs.find(path):
        relative = os.path.relpath(remote, path)
        if relative.startswith(".."):
            continue
        local = os.path.join(staging, relative)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fs.get_file(remote, local)
    try:
        os.replace(staging, target)  # atomic: a half-copied folder is never mistaken for a model
    except OSError:
        if not os.path.isdir(target):
            raise
        shutil.rmtree(staging)  # another process finished the same copy first
    return target


def _hub_snapshot(model_id: str) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"])


@cache
def _sha256_of_files(files: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


_IMPORTING_TRANSFORMERS = threading.Lock()


def transformers() -> ModuleType:
    """The transformers package, imported on first use: it takes about a second, which a job with
    the bundled models does not pay where it only resolves its settings, nor a worker that embeds
    nothing. Imported under a lock: the package puts a lazy module in its own place in
    ``sys.modules`` as its import ends, so a thread that imports it meanwhile (a preparing thread
    loading its tokenizer beside another) would get the half-made package, without its names."""
    with _IMPORTING_TRANSFORMERS:
        return importlib.import_module("transformers")


def model_config(directory: str) -> Any:
    """A Hugging Face model folder's configuration, as ``AutoConfig`` reads it."""
    return transformers().AutoConfig.from_pretrained(directory)


def load_pretrained(model_class: Any, directory: str) -> Any:
    """``model_class.from_pretrained(directory)`` as every Hugging Face model here loads: from
    safetensors only (never a pickle), with no remote code, and with no progress bar (one per
    worker and model is noise in job logs)."""
    transformers().utils.logging.disable_progress_bar()
    return model_class.from_pretrained(directory, use_safetensors=True, trust_remote_code=False)
