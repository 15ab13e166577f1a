"""What one run is, resolved from its options before any data moves: the input files, the
modalities and their models, the fusion, the output layout, and the metadata the tables carry."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Mapping

import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from mmfeatures import __version__, schema, storage
from mmfeatures.encoders.handler import default_batch_cost, default_micro_batch_size
from mmfeatures.errors import ERROR_TYPE_PREFIX, ConfigurationError
from mmfeatures.fusion import Fusion, parse_weights
from mmfeatures.modalities import MODALITIES, Limits, Modality
from mmfeatures.options import ExtractOptions, extract_option_values
from mmfeatures.records import MODALITY_COLUMNS
from mmfeatures.redaction import redact, redact_all


@dataclass
class Job:
    inputs: list[str]
    output: str
    modalities: dict[str, Modality]
    fusion: Fusion
    device: str
    batch_costs: dict[str, int]
    rows_per_file: int
    micro_batch_sizes: dict[str, int]
    precision: str
    torch_threads: int | None
    model_copies: int | None
    limits: Limits
    location_policy: storage.LocationPolicy
    options: dict[str, Any]
    started: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc))
    models: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "Job":
        """Resolve a run from its options; anything wrong with them is a ``ConfigurationError``
        raised here, before any data moves."""
        started = datetime.datetime.now(datetime.timezone.utc)
        try:
            return cls._from_options(options, started)
        except (ValueError, OSError, ModuleNotFoundError) as exc:
            # OSError: an input or model folder that cannot be listed or copied is a configuration
            # problem too. ``from None``: the cause's text may hold a signed URL, which a printed
            # traceback would show; the message itself is redacted.
            raise ConfigurationError(redact(str(exc))) from None

    @classmethod
    def _from_options(cls, options: PipelineOptions, started: datetime.datetime) -> "Job":
        extract = options.view_as(ExtractOptions)
        if not extract.input:
            raise ValueError("--input is required (a manifest path or glob)")
        if not extract.output:
            raise ValueError("--output is required (a local folder or fsspec URL)")
        if extract.device != "cpu" and not extract.device.startswith("cuda"):
            raise ValueError(f"--device must be cpu or cuda (or cuda:N), not {extract.device!r}")
        for flag in ("micro_batch_size", "torch_threads", "model_copies"):
            if getattr(extract, flag) is not None and getattr(extract, flag) < 1:
                raise ValueError(f"--{flag} must be at least 1, not {getattr(extract, flag)}")
        limits = Limits(
            max_bytes=extract.max_bytes,
            max_pixels=extract.max_pixels,
            max_audio_seconds=extract.max_audio_seconds,
            max_text_chars=extract.max_text_chars,
        )
        modalities = {name: MODALITIES[name](getattr(extract, f"{name}_model"), limits) for name in MODALITY_COLUMNS}
        # Redacted once, here: a model folder may be a signed URL, and these go into every output.
        models = redact_all({name: modality.describe() for name, modality in modalities.items()})
        fusion = Fusion(
            method=extract.fusion,
            dims={name: models[name]["dimension"] for name in MODALITY_COLUMNS},
            weights=parse_weights(extract.fusion_weights),
            projection_dim=extract.fusion_dim,
            seed=extract.fusion_seed,
        )
        batch_costs = {
            name: getattr(extract, f"{name}_batch_cost") or default_batch_cost(modalities[name], extract.device)
            for name in MODALITY_COLUMNS
        }
        micro_batch_sizes = {
            name: extract.micro_batch_size or default_micro_batch_size(modalities[name], extract.device)
            for name in MODALITY_COLUMNS
        }
        recorded = extract_option_values(options)
        recorded["runner"] = str(options.view_as(StandardOptions).runner)
        recorded["micro_batch_size"] = ",".join(f"{name}={size}" for name, size in micro_batch_sizes.items())
        recorded.update({f"{name}_batch_cost": cost for name, cost in batch_costs.items()})
        inputs = storage.expand_inputs(extract.input)
        return cls(
            inputs=inputs,
            output=extract.output,
            modalities=modalities,
            fusion=fusion,
            device=extract.device,
            batch_costs=batch_costs,
            rows_per_file=extract.rows_per_file,
            micro_batch_sizes=micro_batch_sizes,
            precision=extract.precision,
            torch_threads=extract.torch_threads,
            model_copies=extract.model_copies,
            limits=limits,
            location_policy=storage.LocationPolicy.from_roots(_allowed_roots(extract.allowed_roots or [], inputs)),
            options=recorded,
            started=started,
            models=models,
        )

    def embedding_options(self, name: str) -> dict[str, Any]:
        """How modality ``name`` is batched and run: ``EmbeddingModelHandler``'s keyword arguments."""
        return {
            "device": self.device,
            "max_batch_cost": self.batch_costs[name],
            "micro_batch_size": self.micro_batch_sizes[name],
            "precision": self.precision,
            "threads": self.torch_threads,
            "model_copies": self.model_copies,
        }

    def path(self, *parts: str) -> str:
        return storage.join(self.output, *parts)

    def metadata(self) -> dict[str, Any]:
        """The JSON every feature file carries under the ``mmfeatures`` key."""
        return {
            "package_version": __version__,
            "schema_version": schema.SCHEMA_VERSION,
            "modalities": self.models,
            "fusion": self.fusion.describe(),
            "created": self.started.isoformat(),
        }

    def features_schema(self, carried: Mapping[str, pa.DataType]) -> pa.Schema:
        dims = {name: model["dimension"] for name, model in self.models.items()}
        dims["fused"] = self.fusion.output_dim
        return schema.features_schema(dims, carried, self.metadata())

    def summary(
        self,
        *,
        counts: Mapping[str, int],
        features: Mapping[str, int],
        errors: Mapping[str, int],
    ) -> dict[str, Any]:
        """``_run.json``: every count comes from the data the run produced and wrote. Every string
        in it is redacted (inputs, outputs, options, model references): no credential or signed
        URL is ever written there."""
        accepted = counts.get("records_accepted", 0)
        with_features = counts.get("records_with_features", 0)
        modalities = {}
        for name in MODALITY_COLUMNS:
            modality = {key: counts.get(f"{name}.{key}", 0) for key in ("present", "embedded", "failed")}
            modality["absent"] = accepted - modality["present"]
            modalities[name] = modality
        records = {
            "read": counts.get("rows_read", 0),
            "rejected": counts.get("rejected_rows", 0),
            "accepted": accepted,
            "with_features": with_features,
            "without_features": accepted - with_features,
        }
        checks = {
            "every_row_accounted_for": records["read"] == records["rejected"] + accepted,
            "feature_rows_match": features["rows"] == with_features,
            "error_rows_match": errors["rows"] == counts.get("error_rows", 0),
            "modalities_reconcile": all(c["present"] == c["embedded"] + c["failed"] for c in modalities.values()),
        }
        return redact_all(
            {
                "records": records,
                "feature_rows": features["rows"],
                "feature_files": features["files"],
                "error_rows": errors["rows"],
                "errors_by_type": {
                    key.removeprefix(ERROR_TYPE_PREFIX): count
                    for key, count in sorted(counts.items())
                    if key.startswith(ERROR_TYPE_PREFIX)
                },
                "modalities": modalities,
                "reconciles": all(checks.values()),
                "checks": checks,
                "models": self.models,
                "fusion": self.fusion.describe(),
                "options": self.options,
                "inputs": self.inputs,
                "outputs": {"features": self.path("features"), "errors": self.path("errors")},
                "started": self.started.isoformat(),
                "package_version": __version__,
            }
        )


INPUTS_ROOT = "inputs"


def _allowed_roots(roots: list[str], inputs: list[str]) -> list[str]:
    """``--allowed_roots`` with ``inputs`` replaced by the folders of the manifests."""
    expanded: list[str] = []
    for root in roots:
        expanded += sorted({storage.parent(path) for path in inputs}) if root == INPUTS_ROOT else [root]
    return expanded
