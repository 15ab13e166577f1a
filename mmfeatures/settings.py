"""How each modality is batched and run: one typed ``InferenceSettings`` per modality, resolved once
from the options (see ``Job``) and passed whole to the stage that embeds it.

The defaults below depend on the device's type and the modality; docs/throughput.md has the
measurements they rest on. Nothing here imports torch, so that ``--help`` stays instant.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

PRECISIONS = ("bf16", "fp16", "fp32")  # fp32 runs the model as loaded; the others under autocast
# Where the forward passes run: PyTorch, or ONNX Runtime on an ONNX export of each encoder (fp32).
RUNTIMES = ("torch", "onnx")

# Rows in one forward pass, per device type and modality (others: "default"). A CPU runs short
# sentences best a few at a time and a convolutional network fewer still, as larger activations
# leave the caches; an audio encoder gains less from batching than the repeats that fill a
# bucket's last pass cost. A GPU needs many rows per pass to stay busy.
MICRO_BATCH_SIZES = {
    "cpu": {"text": 8, "image": 4, "audio": 1, "default": 8},
    "cuda": {"default": 64},
}
# A batch's cost, a modality's ``batch_cost`` scaled per device type: a GPU batch holds many passes.
BATCH_COST_FACTORS = {"cpu": 1, "cuda": 16}
# Every forward pass is padded to exactly the micro-batch size, whatever its batch holds, so this
# is what one pass allocates: beyond the most windows a batch holds at the default costs (64 images
# on a CPU, 16 times that on a GPU) a pass outgrows the batch costs that bound memory; 100000 rows
# of images are one 56 GiB array.
MOST_MICRO_BATCH_SIZES = {kind: 64 * factor for kind, factor in BATCH_COST_FACTORS.items()}
# A batch's values are held in memory as float32, and the batcher buffers four batches: 2**30
# values is 4 GiB a batch, 7 times the largest default (1024 images on a GPU).
MOST_BATCH_COST = 2**30
# A length bucket goes out once it fills this many passes, whatever its cost: short inputs would
# otherwise wait for thousands of records while the model idles. On a CPU a batch is one turn of
# the model at the cores (see ``host.CoreTurns``), and each turn has a cost of its own (its first
# pass refills the caches that preparing used), which weighs most where preparing is heavy
# (images). A GPU runs its passes without waiting for the host.
MICRO_BATCHES_PER_BATCH = {
    "cpu": {"image": 16, "default": 8},
    "cuda": {"default": 8},
}
# Records the preparing step keeps in flight: enough to keep preparing while a GPU batch runs, and
# a bound on memory. On a CPU the preparing threads wait for the model's turns anyway.
PREPARE_AHEAD = {"cpu": 256, "cuda": 2048}


def device_type(device: str) -> str:
    """``cpu`` or ``cuda`` (for ``cuda:1`` too); a ``ValueError`` for any other device."""
    kind = device.split(":", 1)[0]
    if kind not in MICRO_BATCH_SIZES:
        raise ValueError(f"--device must be cpu or cuda (or cuda:N), not {device!r}")
    return kind


def default_runtime(device: str, precision: str) -> str:
    """The runtime a run takes where ``--runtime`` is not given: ONNX Runtime on a CPU at fp32,
    where it is installed (it embeds images and text faster there; see docs/throughput.md), torch
    otherwise: ONNX Runtime runs fp32 only, and on a GPU it has not been measured against torch."""
    if device_type(device) == "cpu" and precision == "fp32" and importlib.util.find_spec("onnxruntime"):
        return "onnx"
    return "torch"


def _per_device_and_modality(table: dict[str, dict[str, int]], device: str, modality: str) -> int:
    values = table[device_type(device)]
    return values.get(modality, values["default"])


@dataclass(frozen=True)
class InferenceSettings:
    """How one modality's records are prepared, batched and run.

    ``max_batch_cost``: most input values in one batch; ``micro_batch_size``: rows in each forward
    pass (every pass has exactly this many, so an embedding never depends on its batch);
    ``micro_batches_per_batch``: most passes in one batch; ``prepare_ahead``: records prepared
    ahead of the model; ``threads``: the runtime's threads in a worker process (None: one per core
    it may use); ``model_copies``: copies of the model per machine, shared by its worker processes
    (None: one per process); ``runtime``: where the forward passes run (``RUNTIMES``).
    """

    device: str = "cpu"
    precision: str = "fp32"
    max_batch_cost: int = 8192
    micro_batch_size: int = MICRO_BATCH_SIZES["cpu"]["default"]
    micro_batches_per_batch: int = MICRO_BATCHES_PER_BATCH["cpu"]["default"]
    prepare_ahead: int = PREPARE_AHEAD["cpu"]
    threads: int | None = None
    model_copies: int | None = None
    runtime: str = "torch"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {self.precision!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {sorted(RUNTIMES)}, not {self.runtime!r}")
        if self.runtime == "onnx" and self.precision != "fp32":
            raise ValueError(f"--runtime onnx runs fp32 only: --precision {self.precision} runs under --runtime torch")
        if self.runtime == "onnx" and not importlib.util.find_spec("onnxruntime"):
            raise ValueError(
                "--runtime onnx needs onnxruntime: install mmfeatures[cpu] (or [cuda]), or run --runtime torch"
            )
        device_type(self.device)  # refuses a device of no known type
        for name in ("max_batch_cost", "micro_batch_size", "micro_batches_per_batch", "prepare_ahead"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")

    @classmethod
    def for_modality(
        cls,
        modality: str,
        batch_cost: int,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        max_batch_cost: int | None = None,
        micro_batch_size: int | None = None,
        threads: int | None = None,
        model_copies: int | None = None,
        runtime: str = "torch",
    ) -> InferenceSettings:
        """The settings of ``modality`` (whose preprocessor weighs ``batch_cost`` values to a batch
        on a CPU) on ``device``: the given values, and the defaults above for the others."""
        kind = device_type(device)
        return cls(
            device=device,
            precision=precision,
            max_batch_cost=batch_cost * BATCH_COST_FACTORS[kind] if max_batch_cost is None else max_batch_cost,
            micro_batch_size=(
                _per_device_and_modality(MICRO_BATCH_SIZES, device, modality)
                if micro_batch_size is None
                else micro_batch_size
            ),
            micro_batches_per_batch=_per_device_and_modality(MICRO_BATCHES_PER_BATCH, device, modality),
            prepare_ahead=PREPARE_AHEAD[kind],
            threads=threads,
            model_copies=model_copies,
            runtime=runtime,
        )
