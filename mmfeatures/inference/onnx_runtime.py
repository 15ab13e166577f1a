"""ONNX Runtime as a runtime: an encoder's forward pass exported once to ONNX and run by
``onnxruntime`` on the CPU (or CUDA) execution provider, fp32.

The export is the encoder's whole ``forward`` (the model and its pooling), traced on the first
micro-batch a worker runs, with the encoder's varying axes (``Encoder.export_axes``) left dynamic
so that one file serves every micro-batch size and length bucket; micro-batches themselves keep
their fixed shapes (see ``Embedder.micro_batches``). Exports are cached on the machine
(``storage.cache_root()``/onnx), named by a key of everything that shapes them (``export_key``).
A file is written under a temporary name and renamed into place, so a killed export never leaves
a half file that a later run would load. A model that does not export, or whose export differs
from torch, runs on torch instead (``OnnxEncoder.fallback`` says why, and the run's summary too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import version
from typing import Any

import numpy as np

from mmfeatures import __version__, storage
from mmfeatures.host import available_cores
from mmfeatures.inference.runtime import Runtime
from mmfeatures.inference.torch_runtime import TorchRuntime
from mmfeatures.modalities.base import Batch, Encoder, Window
from mmfeatures.settings import device_type

_LOG = logging.getLogger(__name__)

OPSET = 17
_OUTPUT = "embedding"
# Most absolute difference of an export's embeddings from torch's on its checks: float32 kernels
# that sum in another order differ by about 1e-6.
EXPORT_TOLERANCE = 1e-4


def export_key(encoder: Encoder[Any], weights_sha256: str) -> str:
    """The name of ``encoder``'s export: changed weights, model configuration, encoder code (this
    package's version), exporter, model library or runtime export again."""
    import onnxruntime
    import torch

    config = getattr(getattr(encoder, "model", None), "config", None)  # a Hugging Face model's
    described = {
        "weights_sha256": weights_sha256,
        "config": config.to_dict() if config is not None else None,
        "encoder": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
        "axes": encoder.export_axes,
        "opset": OPSET,
        # onnx's version from its metadata: importing it takes a second, and only an export needs it.
        "versions": [__version__, torch.__version__, version("onnx"), onnxruntime.__version__, _transformers()],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _transformers() -> str | None:
    """transformers' version where the process has it (it builds Hugging Face models' graphs)."""
    module = sys.modules.get("transformers")
    return getattr(module, "__version__", None)


def export(encoder: Encoder[Any], inputs: Batch, path: str, session: Callable[[str], Any]) -> None:
    """Trace ``encoder.forward`` on ``inputs`` into an ONNX file at ``path``, atomically, once the
    export (opened by ``session``) gives what torch gives on ``inputs`` and on ``inputs`` cut along
    each dynamic axis: a trace keeps the branches its example took, so a model whose code branches
    on its inputs' sizes must not pass for one that does not."""
    import torch

    axes = encoder.export_axes
    assert axes is not None
    names = list(inputs)
    model = getattr(encoder, "model", None)
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")

    def on_device(batch: Batch) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(array).to(device) for name, array in batch.items()}

    class Forward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model  # registered, so its weights are the graph's

        def forward(self, *arrays: torch.Tensor) -> torch.Tensor:
            return encoder.forward(dict(zip(names, arrays, strict=True)))

    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=folder, prefix=".export-", suffix=".onnx")
    os.close(handle)
    dynamic = {name: dict(axes.get(name, {0: "rows"})) for name in names}
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # The tracer warns of every Python branch it freezes; the check below is what tells.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = on_device(inputs)
            torch.onnx.export(
                Forward().eval(),  # the exporter restores the module's mode after: the encoder's, eval
                tuple(traced[name] for name in names),
                partial,
                input_names=names,
                output_names=[_OUTPUT],
                dynamic_axes={**dynamic, _OUTPUT: {0: "rows"}},
                opset_version=OPSET,
                dynamo=False,
            )
            exported = session(partial)
            for checked in [inputs, *_cuts(inputs, dynamic)]:
                expected = encoder.forward(on_device(checked)).float().cpu().numpy()
                given = exported.run([_OUTPUT], checked)[0]
                if not np.allclose(given, expected, rtol=0, atol=EXPORT_TOLERANCE):
                    raise ValueError(
                        f"the ONNX export of {type(encoder).__name__} differs from torch on inputs of shapes "
                        f"{ {name: array.shape for name, array in checked.items()} }"
                    )
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _cuts(inputs: Batch, dynamic: Mapping[str, Mapping[int, str]]) -> list[Batch]:
    """``inputs`` cut to half its size along each named dynamic axis in turn (every input that has
    that axis), where the axis holds at least two."""
    cuts = []
    for axis_name in sorted({name for axes in dynamic.values() for name in axes.values()}):
        cut = {}
        for name, array in inputs.items():
            axis = next((axis for axis, named in dynamic[name].items() if named == axis_name), None)
            cut[name] = array if axis is None else np.take(array, range(max(1, array.shape[axis] // 2)), axis=axis)
        if any(cut[name].shape != inputs[name].shape for name in inputs):
            cuts.append(cut)
    return cuts


class OnnxEncoder(Encoder[np.ndarray]):
    """``source``'s collate, and its forward pass run by an ONNX Runtime session, made from the
    export at ``path`` (exported from the first batch when the file is not there yet). Without
    ``path`` (an encoder that has no export), or where the export fails, ``source`` runs on torch,
    at fp32, and ``fallback`` says why: the records are embedded, not lost to the runtime."""

    def __init__(self, source: Encoder[Any], path: str | None, runtime: OnnxRuntime):
        self.source = source
        self.dimension = source.dimension
        self.path = path
        self.runtime = runtime
        self.fallback: str | None = None
        self._torch = TorchRuntime(runtime.device, "fp32")
        self._session: Any = None
        self._opening = threading.Lock()
        if path is None:
            self._fall_back(f"{type(source).__name__} has no ONNX export")

    def collate(self, windows: Sequence[Window], length: int = 0) -> Batch:
        return self.source.collate(windows, length)

    def forward(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        session = self._session or self._open(batch)
        if session is None:
            return self._torch.to_host([self._torch.forward(self.source, self._torch.to_device(batch))])
        return session.run([_OUTPUT], batch)[0]

    def _open(self, example: Mapping[str, np.ndarray]) -> Any:
        """The session, exported from ``example`` if need be; None where the encoder runs on torch.
        An export is tried once: one that fails sends every batch after it to torch too."""
        with self._opening:
            if self._session is None and self.fallback is None:
                assert self.path is not None
                try:
                    if not os.path.exists(self.path):
                        _LOG.info("exporting %s to ONNX at %s", type(self.source).__name__, self.path)
                        export(self.source, dict(example), self.path, self.runtime.session)
                    self._session = self.runtime.session(self.path)
                    # The session holds the weights now: the torch model (which only exporting
                    # needs) goes, so that a worker holds one copy of them, not two.
                    vars(self.source).pop("model", None)
                except Exception as exc:  # noqa: BLE001 - the records run on torch; the summary tells
                    self._fall_back(f"{type(self.source).__name__} cannot run on ONNX Runtime: {exc}")
        return self._session

    def _fall_back(self, reason: str) -> None:
        _LOG.warning("%s: its records are embedded on torch", reason)
        self.fallback = reason
        self._torch.prepare_process(self.runtime.threads)


class OnnxRuntime(Runtime[np.ndarray]):
    """ONNX Runtime on the CPU, or on CUDA through its CUDA execution provider; fp32 only."""

    def __init__(self, device: str):
        self.device = device
        self.threads = available_cores()

    @property
    def provider(self) -> str:
        return "CUDAExecutionProvider" if device_type(self.device) == "cuda" else "CPUExecutionProvider"

    def _providers(self) -> list[Any]:
        """The execution provider, on the device's index where it names one (``cuda:1``)."""
        if self.provider == "CUDAExecutionProvider":
            index = self.device.partition(":")[2]
            return [(self.provider, {"device_id": int(index or 0)})]
        return [self.provider]

    def prepare_process(self, threads: int | None) -> None:
        import onnxruntime

        if self.provider not in onnxruntime.get_available_providers():
            raise RuntimeError(
                f"--runtime onnx on {self.device} needs onnxruntime's {self.provider} "
                "(onnxruntime-gpu for CUDA), which this worker's onnxruntime does not have"
            )
        self.threads = threads or available_cores()
        self.lanes = 1 if self.provider == "CUDAExecutionProvider" else self.threads

    def compile(self, encoder: Encoder[Any], weights_sha256: Callable[[], str]) -> Encoder[Any]:
        if encoder.export_axes is None:
            return OnnxEncoder(encoder, None, self)
        path = os.path.join(storage.cache_root(), "onnx", f"{export_key(encoder, weights_sha256())}.onnx")
        return OnnxEncoder(encoder, path, self)

    def fallback(self, encoder: Encoder[Any]) -> str | None:
        return encoder.fallback if isinstance(encoder, OnnxEncoder) else None

    def session(self, path: str) -> Any:
        """A session for the export at ``path``: every optimisation, one intra-op thread per pass on
        a CPU (its lanes run passes side by side) and the worker's cores on a GPU, threads that
        sleep rather than spin between passes (the preparing threads need the cores then), and no
        memory arena or pattern, which would keep the largest length bucket's buffers."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads // self.lanes
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return onnxruntime.InferenceSession(path, options, providers=self._providers())

    def to_device(self, batch: Batch) -> dict[str, np.ndarray]:
        return dict(batch)

    def forward(self, encoder: Encoder[np.ndarray], inputs: dict[str, np.ndarray]) -> np.ndarray:
        return encoder.forward(inputs)

    def to_host(self, outputs: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(outputs).astype(np.float32, copy=False)
