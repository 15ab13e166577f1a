"""The job's work in Ray Data, as a user writes it: read the manifest, embed with a callable class
that loads the model once per actor (reading each record's media there), write Parquet.

    PYTHONPATH=.peers-env .venv/bin/python -m benchmarks.peer_programs.ray_peer --modality image \\
        --manifest M --output DIR --reading stock --setup threads --cores 2

Set-ups: ``threads``, one actor on a thread per core; ``processes``, one single-threaded actor per
core. The actors share one logical CPU fewer than the cores: given them all, none is left for the
read task, and the run hangs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import ray  # type: ignore[import-not-found, unused-ignore]  # in .peers-env, not the job's venv

from benchmarks.peer_programs.models import PeerModel, check_arguments, media_path, peer_arguments, rows_per_call


class Embed:
    """One ``PeerModel`` an actor: a batch of manifest rows in, their ids and vectors out."""

    def __init__(self, modality: str, reading: str, threads: int, manifest: Path):
        self.modality = modality
        self.manifest = manifest
        self.model = PeerModel(modality, reading, threads)

    def __call__(self, rows: pa.Table) -> pa.Table:
        references = rows.column(self.modality).to_pylist()
        if self.modality == "text":
            payloads: list[bytes | str] = references
        else:
            payloads = [Path(media_path(self.manifest, reference)).read_bytes() for reference in references]
        vectors = [vector.tolist() for vector in self.model.embed(payloads)]
        return pa.table({"id": rows.column("id"), "embedding": pa.array(vectors, pa.list_(pa.float32()))})


def main(argv: list[str] | None = None) -> int:
    parser = peer_arguments("python -m benchmarks.peer_programs.ray_peer", "The job's work in Ray Data.")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    actors = args.cores if args.setup == "processes" else 1
    ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.read_json(str(args.manifest)).map_batches(
        Embed,
        fn_constructor_kwargs={
            "modality": args.modality,
            "reading": args.reading,
            "threads": args.cores // actors,
            "manifest": args.manifest,
        },
        batch_size=rows_per_call(args.modality),
        batch_format="pyarrow",
        concurrency=actors,
        num_cpus=(args.cores - 1 or 0.5) / actors,
    )
    dataset.write_parquet(str(args.output))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
