"""Every option of the job, its default and its help, in one PipelineOptions subclass: the CLI,
``python -m pipelines.extract_features`` and Dataflow all read the same options."""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from mmfeatures.errors import ConfigurationError
from mmfeatures.fusion import FUSION_METHODS
from mmfeatures.lease import DEFAULT_LEASE_SECONDS
from mmfeatures.limits import Limits, check_option
from mmfeatures.records import MODALITY_COLUMNS
from mmfeatures.settings import MOST_BATCH_COST, MOST_MICRO_BATCH_SIZES, PRECISIONS, RUNTIMES, device_type

LOCAL_RUNNER = "FnApiRunner"  # Beam's in-process runner; DirectRunner would first try to download Prism
# The runners that run every stage in this process, holding what passes between stages in memory.
IN_PROCESS_RUNNERS = frozenset({LOCAL_RUNNER, "DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner"})

# The integer options' ranges, and why a value past the top cannot work (None: the option unset).
INTEGER_RANGES: dict[str, tuple[int, int, str]] = {
    "fusion_dim": (1, 16_384, "each worker holds every modality's projection to it, and each row a vector of it"),
    "fusion_seed": (0, 2**63 - 1, "the tables' metadata records it for readers of 64-bit integers"),
    "torch_threads": (1, 1024, "more than any machine's cores"),
    "model_copies": (1, 64, "every copy is loaded on every machine"),
    "rows_per_file": (1, 100_000, "a file's rows are held in memory until it is written"),
    "lease_seconds": (10, 86_400, "a killed run keeps other runs off its output until its lease expires"),
    **{
        f"{name}_batch_cost": (1, MOST_BATCH_COST, "a batch's values are held in memory, four batches at a time")
        for name in MODALITY_COLUMNS
    },
}


class ExtractOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        def add(*flags: str, **kwargs) -> None:
            dashed = [flag.replace("_", "-") for flag in flags if "_" in flag]
            parser.add_argument(*flags, *dashed, **kwargs)

        def add_switch(flag: str, help: str) -> None:
            """An on/off option: on when given alone, or ``--flag=true`` / ``--flag=false``, as a
            Dataflow Flex Template launch passes each of its parameters ``--name=value``."""
            add(
                flag, dest=flag[2:], nargs="?", const=True, default=False, type=_switch, metavar="true|false", help=help
            )

        add(
            "--input",
            dest="input",
            action="extend",
            nargs="+",
            default=None,
            help="Inputs (local or fsspec URLs): manifests (JSONL, CSV, Parquet, Arrow), tar shards, "
            "globs, brace patterns, or folders (a Hugging Face save_to_disk dataset, a folder of "
            "manifests, or a folder of media files): every value up to the next option, so a glob "
            "the shell expanded works. Repeatable.",
        )
        add(
            "--columns",
            dest="columns",
            default=None,
            help="Which input columns fill the job's fields, e.g. text=sentence,image=img,id=uid. "
            "Without an id column a record's id is FILE:ROW, FILE its path under the --input pattern's folder.",
        )
        add(
            "--csv_encoding",
            dest="csv_encoding",
            default=None,
            help="The encoding of CSV manifests, e.g. cp1252 (default UTF-8); a row that is not in it is an error row.",
        )
        add(
            "--csv_delimiter",
            dest="csv_delimiter",
            default=None,
            help="The delimiter of CSV manifests, one character or 'tab', e.g. ';' (default: sniffed from the "
            "header line among , ; tab |).",
        )
        add_switch(
            "--label_from_folder",
            help="Folders of media files: a file's top folder under the input is its record's label, "
            "as torchvision's ImageFolder reads photos/cat/1.jpg.",
        )
        add(
            "--output",
            dest="output",
            default=None,
            help="Output folder (local path or fsspec URL): features/, errors/ and _run.json go here.",
        )
        add(
            "--fusion",
            dest="fusion",
            default="concat",
            choices=FUSION_METHODS,
            help="How modality embeddings become one vector.",
        )
        add(
            "--fusion_weights",
            dest="fusion_weights",
            default=None,
            help="Per-modality weights, e.g. text=0.2,image=0.3,audio=0.5 (default 1 each).",
        )
        add(
            "--fusion_dim",
            dest="fusion_dim",
            type=int,
            default=512,
            help="Common dimension of the mean and weighted fusions' projections.",
        )
        add(
            "--fusion_seed",
            dest="fusion_seed",
            type=int,
            default=0,
            help="Seed of the mean and weighted fusions' fixed projections.",
        )
        for modality in MODALITY_COLUMNS:
            add(
                f"--{modality}_model",
                dest=f"{modality}_model",
                default="default",
                help=f"{modality} encoder: 'default' (bundled), a Hugging Face model id, or a model folder "
                "(local or fsspec URL) in Hugging Face layout with safetensors weights.",
            )
            add(
                f"--{modality}_batch_cost",
                dest=f"{modality}_batch_cost",
                type=int,
                default=None,
                help=f"Most {modality} input values (tokens, pixels or mel values) in one RunInference "
                "batch (default: the modality's own, see README; 16 times that on a GPU).",
            )
        add("--device", dest="device", default="cpu", help="Torch device for the encoders: cpu or cuda.")
        add(
            "--micro_batch_size",
            dest="micro_batch_size",
            type=int,
            default=None,
            help="Windows per forward pass, for every modality (default: on a CPU 8 texts, 4 images, "
            "1 audio clip; 64 on a GPU). Every pass has exactly this many rows, so a record's "
            "embedding does not depend on its batch.",
        )
        add(
            "--precision",
            dest="precision",
            default="fp32",
            choices=sorted(PRECISIONS),
            help="fp32 runs the models as loaded; bf16 and fp16 run them under torch autocast (for "
            "GPUs' tensor cores; on a CPU only where it has bf16 instructions).",
        )
        add(
            "--runtime",
            dest="runtime",
            default=None,
            choices=RUNTIMES,
            help="Where the forward passes run: torch, or onnx (ONNX Runtime on an export of each "
            "image and text encoder, made once per machine and cached; fp32 only; audio runs on torch; "
            "a model that does not export runs on torch, and the run's summary says so). Default: onnx "
            "on a CPU at fp32 where onnxruntime is installed (measured faster there), torch otherwise.",
        )
        add(
            "--torch_threads",
            dest="torch_threads",
            type=int,
            default=None,
            help="The model runtime's threads per worker process (torch's, or ONNX Runtime's intra-op "
            "threads; default: the cores the process may use). With "
            "several worker processes on one machine, give each its share of the cores.",
        )
        add(
            "--model_copies",
            dest="model_copies",
            type=int,
            default=None,
            help="Load this many copies of each model per machine, shared by all of its worker "
            "processes (Beam's multi-process shared model), instead of one per process: "
            "e.g. 1 to fit the three models once on one GPU.",
        )
        defaults = Limits()
        add(
            "--max_bytes",
            dest="max_bytes",
            type=int,
            default=defaults.max_bytes,
            help="Largest media file read, in bytes; larger ones are error rows (file_too_large).",
        )
        add(
            "--max_pixels",
            dest="max_pixels",
            type=int,
            default=defaults.max_pixels,
            help="Largest image, width x height, checked from its header before decoding (image_too_large).",
        )
        add(
            "--max_audio_seconds",
            dest="max_audio_seconds",
            type=float,
            default=defaults.max_audio_seconds,
            help="Longest audio clip, checked before decoding; longer ones are error rows (audio_too_long).",
        )
        add(
            "--max_text_chars",
            dest="max_text_chars",
            type=int,
            default=defaults.max_text_chars,
            help="Longest text, in characters; longer ones are error rows (text_too_long).",
        )
        add(
            "--allowed_roots",
            dest="allowed_roots",
            action="append",
            default=None,
            help="Read media only under these roots (repeatable): local folders, URL prefixes "
            "(gs://bucket/images) or bare schemes (https://); 'inputs' stands for the folders of "
            "the --input manifests. Other references are error rows (location_not_allowed). "
            "Default: anywhere.",
        )
        add(
            "--rows_per_file",
            dest="rows_per_file",
            type=int,
            default=2000,
            help="Most rows in one output Parquet file.",
        )
        add(
            "--lease_seconds",
            dest="lease_seconds",
            type=int,
            default=DEFAULT_LEASE_SECONDS,
            help="How long the run's lease on --output lasts unless renewed (the running job renews "
            "it every third of this): another run on the same --output is refused while it lasts, "
            "and may take the output over once a killed run's lease has expired.",
        )
        add_switch(
            "--incremental",
            help="Update the table at --output in place: a record whose id, content (its text and media "
            "bytes) and settings match a row of it keeps that row, without being decoded or embedded; "
            "new records are added, changed ones recomputed. Records absent from the inputs keep their "
            "rows unless --drop-missing.",
        )
        add_switch(
            "--drop_missing",
            help="With --incremental: drop the rows of records absent from this run's inputs.",
        )
        add(
            "--timestamp_column",
            dest="timestamp_column",
            default=None,
            help="A manifest column holding each record's own event time (ISO 8601 text, or a "
            "timestamp or date column): it becomes the row's event_timestamp. A record without a "
            "valid one is an error row (invalid_timestamp). Default: the start of the run that "
            "computed the row.",
        )
        add(
            "--partition_by",
            dest="partition_by",
            default=None,
            help="Write the feature table in Hive-style folders (features/split=train/...) by this "
            "column: split, label, a carried manifest column, or event_date (the UTC date of "
            "event_timestamp).",
        )


def _switch(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{value!r} is neither true nor false")
    return value.lower() == "true"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmfeatures extract",
        description="Embed the records of manifests and write Parquet feature tables.",
        epilog="Any Apache Beam pipeline option is accepted too (e.g. --runner=DataflowRunner). "
        f"Without --runner the job runs on Beam's in-process {LOCAL_RUNNER}. Arguments after a bare "
        "'--' go to Beam unchecked, for the options it forwards to a runner; any other argument that "
        "is not an option is refused.",
    )
    ExtractOptions._add_argparse_args(parser)
    return parser


def parse_options(argv: list[str] | None = None) -> PipelineOptions:
    """The job's options from a command line; ``--help`` prints them and exits.

    Every argument is an option of the job or of Beam, or a ``ConfigurationError`` (a misspelt
    option would otherwise run with settings nobody chose); arguments after a bare ``--`` go to
    Beam as they are, for the options it forwards unparsed to a runner. The local in-process
    runner is the default, since Beam's DirectRunner would first try to download Prism."""
    argv = sys.argv[1:] if argv is None else list(argv)
    checked, forwarded = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    if "-h" in checked or "--help" in checked:
        _parser().print_help()
        raise SystemExit(0)
    _refuse_unknown_arguments(checked)
    options = PipelineOptions(checked + forwarded)
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = LOCAL_RUNNER
    return options


def _refuse_unknown_arguments(argv: list[str]) -> None:
    """Parse ``argv`` with every option Beam knows, the job's included; refuse what is left."""
    parsers: list[argparse.ArgumentParser] = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)  # Beam's own parser, all options
    (parser,) = parsers
    parser.exit_on_error = False  # errors as exceptions, to be told in one line
    try:
        _, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise ConfigurationError(str(exc)) from None
    if unknown:
        argument = unknown[0]
        known = [flag for action in parser._actions for flag in action.option_strings]
        close = difflib.get_close_matches(argument.split("=", 1)[0], known, n=1) if argument.startswith("-") else []
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigurationError(
            f"unrecognized argument {argument!r}{hint}: neither an option of the job nor a Beam option; "
            "options for the runner alone go after a bare '--'"
        )


def check_options(extract: ExtractOptions) -> None:
    """Refuse any numeric option out of its range, in one line naming it, before anything is read
    or loaded (the limits check themselves, in ``Limits``)."""
    kind = device_type(extract.device)
    ranges = {
        **INTEGER_RANGES,
        "micro_batch_size": (
            1,
            MOST_MICRO_BATCH_SIZES[kind],
            f"every forward pass is padded to this many rows, and no {kind} batch holds more at the default costs",
        ),
    }
    for name, (least, most, why) in ranges.items():
        if getattr(extract, name) is not None:
            check_option(name, getattr(extract, name), least, most, why=why)


def extract_option_values(options: PipelineOptions) -> dict[str, Any]:
    """This job's own options (never the runner's, which may hold credentials)."""
    extract = options.view_as(ExtractOptions)
    return {action.dest: getattr(extract, action.dest) for action in _parser()._actions if action.dest != "help"}
