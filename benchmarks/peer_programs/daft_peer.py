"""The job's work in Daft, as a user writes it: read the manifest, download the media, embed with a
class UDF that loads the model once per instance, write Parquet.

    PYTHONPATH=.peers-env .venv/bin/python -m benchmarks.peer_programs.daft_peer --modality image \\
        --manifest M --output DIR --reading stock --setup threads --cores 2

Set-ups: ``threads``, one instance on a thread per core (``max_concurrency=1``: Daft runs it in a
worker process of its own); ``processes``, one single-threaded instance per core, each in a process
of its own (``use_process``). Left to Daft (no ``max_concurrency``), instances run in threads of
this process, several at once, each loading the model and running a thread per core.
"""

from __future__ import annotations

import sys

import daft  # type: ignore[import-not-found, unused-ignore]  # in .peers-env, not the job's venv
import pyarrow as pa
import transformers  # noqa: F401 - in the main thread first: its lazy imports failed once in Daft's threads

from benchmarks.peer_programs.models import PeerModel, check_arguments, peer_arguments, rows_per_call


class Embed:
    """The UDF: one ``PeerModel`` an instance, a batch of payloads in, their vectors out."""

    def __init__(self, modality: str, reading: str, threads: int):
        self.model = PeerModel(modality, reading, threads)

    @daft.method.batch(return_dtype=daft.DataType.list(daft.DataType.float32()))
    def __call__(self, payloads: daft.Series) -> pa.Array:
        return pa.array([vector.tolist() for vector in self.model.embed(payloads.to_pylist())], pa.list_(pa.float32()))


def main(argv: list[str] | None = None) -> int:
    parser = peer_arguments("python -m benchmarks.peer_programs.daft_peer", "The job's work in Daft.")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    processes = args.setup == "processes"
    instances = args.cores if processes else 1
    udf = daft.cls(Embed, use_process=processes, max_concurrency=instances)
    embed = udf(args.modality, args.reading, 1 if processes else args.cores)

    df = daft.read_json(str(args.manifest))
    column = daft.col(args.modality)
    if args.modality != "text":
        column = daft.functions.download(daft.lit(f"{args.manifest.parent.resolve()}/") + column)
    df = df.into_batches(rows_per_call(args.modality))
    df = df.select("id", embed(column).alias("embedding"))
    df.write_parquet(str(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
