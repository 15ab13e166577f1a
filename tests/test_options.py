from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
from apache_beam.options.pipeline_options import StandardOptions

from mmfeatures.cli import main
from mmfeatures.errors import ConfigurationError
from mmfeatures.limits import Limits
from mmfeatures.modalities import Preprocessor
from mmfeatures.options import LOCAL_RUNNER, ExtractOptions, extract_option_values, parse_options


def test_dashed_and_underscored_spellings_are_the_same_option() -> None:
    dashed = parse_options(["--fusion-weights", "text=0.2", "--text-model", "m", "--input", "a", "--input", "b"])
    underscored = parse_options(["--fusion_weights", "text=0.2", "--text_model", "m", "--input", "a", "--input", "b"])
    for options in (dashed, underscored):
        extract = options.view_as(ExtractOptions)
        assert extract.fusion_weights == "text=0.2" and extract.text_model == "m"
        assert extract.input == ["a", "b"]


def test_local_runner_is_the_default_and_a_named_runner_is_kept() -> None:
    assert parse_options([]).view_as(StandardOptions).runner == LOCAL_RUNNER
    assert parse_options(["--runner", "DataflowRunner"]).view_as(StandardOptions).runner == "DataflowRunner"


def test_recorded_options_are_the_jobs_own_only() -> None:
    values = extract_option_values(parse_options(["--output", "o", "--s3_secret_access_key", "SECRET"]))
    assert values["output"] == "o" and values["fusion"] == "concat"
    assert "s3_secret_access_key" not in values and "SECRET" not in str(values)


def test_help_lists_the_jobs_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for option in ("--input", "--output", "--fusion", "--fusion_weights", "--device", "--image_model"):
        assert option in printed


def test_help_does_not_import_the_models_libraries() -> None:
    """``--help`` answers at once: neither torch nor transformers is imported for it."""
    code = (
        "import sys\n"
        "from mmfeatures.cli import main\n"
        "try:\n"
        "    main(['extract', '--help'])\n"
        "except SystemExit as exited:\n"
        "    assert exited.code == 0\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--fusion_weights" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_job_with_the_bundled_models_does_not_import_transformers(tmp_path: Path) -> None:
    """transformers takes about a second to import: a job with the bundled models resolves its
    settings without it, and so does a worker whose model handlers embed nothing (an incremental
    rerun's kept records)."""
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"id": "a", "text": "a cat"}\n')
    code = (
        "import sys\n"
        "from mmfeatures.inference.handler import EmbeddingModelHandler\n"
        "from mmfeatures.job import Job\n"
        "from mmfeatures.modalities import MODALITIES\n"
        "from mmfeatures.options import parse_options\n"
        f"argv = ['--input', {str(manifest)!r}, '--output', {str(tmp_path / 'out')!r}]\n"
        "job = Job.from_options(parse_options(argv))\n"
        "for name, preprocessor in job.preprocessors.items():\n"
        "    EmbeddingModelHandler(MODALITIES[name], preprocessor, job.settings[name]).load_model()\n"
        "print(sorted(job.preprocessors), 'transformers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "['audio', 'image', 'text'] False"


@pytest.mark.parametrize(
    ("argv", "on"),
    [([], False), (["--incremental"], True), (["--incremental=true"], True), (["--incremental=False"], False)],
)
def test_an_on_off_option_is_on_alone_or_takes_true_or_false(argv: list[str], on: bool) -> None:
    """As a Dataflow Flex Template launch passes every parameter: ``--name=value``."""
    extract = parse_options([*argv, "--drop-missing=true"]).view_as(ExtractOptions)
    assert (extract.incremental, extract.drop_missing) == (on, True)


def test_an_on_off_option_refuses_any_other_value() -> None:
    with pytest.raises(ConfigurationError, match="--label-from-folder: 'yes' is neither true nor false"):
        parse_options(["--label-from-folder=yes"])


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nonsense"]) == 2
    assert "usage: mmfeatures" in capsys.readouterr().err


def test_progress_logs_each_time_the_count_passes_a_multiple(caplog: pytest.LogCaptureFixture) -> None:
    from mmfeatures.progress import Progress

    progress = Progress("records", every=10)
    with caplog.at_level("INFO", logger="mmfeatures.progress"):
        for batch in (4, 4, 4, 9, 1):
            progress.add(batch)
    assert [r.getMessage().split(" by")[0] for r in caplog.records] == ["records: 12", "records: 21"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output", "o"], "--input is required"),
        (["--input", "/nonexistent/*.jsonl", "--output", "o"], "matches no file"),
        (["--input", "m.jsonl", "--output", "o", "--device", "gpu"], "--device must be cpu or cuda"),
        (["--input", "m.jsonl", "--output", "o", "--csv-encoding", "latin-9000"], "not a text encoding Python knows"),
        (["--input", "m.jsonl", "--output", "o", "--csv-encoding", "base64"], "not a text encoding Python knows"),
        (["--input", "m.jsonl", "--output", "o", "--csv-delimiter", ";;"], "must be one character"),
        (["--input", "m.jsonl", "--output", "o", "--csv-delimiter", '"'], "not a quote or line break"),
        (["--input", "m.jsonl", "--output", "o", "--csv-delimiter", "\n"], "not a quote or line break"),
        (["--input", "m.jsonl", "--output", "o", "--columns", "caption=text"], "'caption' is not a field"),
    ],
)
def test_bad_options_are_usage_errors_before_any_work(argv, message, capsys) -> None:
    assert main(["extract", *argv]) == 2
    assert message in capsys.readouterr().err


def test_reading_options_reach_the_readers(tmp_path) -> None:
    from mmfeatures.job import Job
    from mmfeatures.sources import ReadOptions

    manifest = tmp_path / "m.csv"
    manifest.write_text("id,text\na,t\n")
    base = ["--input", str(manifest), "--output", str(tmp_path / "out")]
    assert Job.from_options(parse_options(base)).read_options == ReadOptions(max_member_bytes=Limits().max_bytes)
    chosen = ["--csv-encoding", "cp1252", "--csv-delimiter", "tab", "--columns", "text=body", "--label-from-folder"]
    assert Job.from_options(parse_options(base + chosen)).read_options == ReadOptions(
        max_member_bytes=Limits().max_bytes,
        csv_encoding="cp1252",
        csv_delimiter="\t",
        label_from_folder=True,
        columns={"text": "body"},
    )


def test_limits_are_options_with_safe_defaults(tmp_path) -> None:
    from mmfeatures.job import Job

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "t"}\n')
    base = ["--input", str(manifest), "--output", str(tmp_path / "out")]
    assert Job.from_options(parse_options(base)).preprocessors["image"].limits == Limits()
    job = Job.from_options(parse_options(base + ["--max-pixels", "100", "--max_audio_seconds", "2.5"]))
    for preprocessor in job.preprocessors.values():
        assert preprocessor.limits.max_pixels == 100 and preprocessor.limits.max_audio_seconds == 2.5
        assert preprocessor.limits.max_bytes == Limits().max_bytes


@pytest.mark.parametrize(
    "command, says",
    [
        ("train", "mmfeatures train"),
        ("report", "mmfeatures report"),
        ("sample", "avmnist"),
    ],
)
def test_every_command_has_its_help(command: str, says: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0 and says in capsys.readouterr().out


# -- every argument is used or refused ----------------------------------------------------------
@pytest.mark.parametrize(
    "extra, names, suggestion",
    [
        (["--bogus-flag", "3"], "'--bogus-flag'", None),
        (["--fusion-weight", "text=2"], "'--fusion-weight'", "did you mean --fusion-weights?"),
        (["--fusion_weight=text=2"], "'--fusion_weight=text=2'", "did you mean --fusion_weights?"),
        (["--inp", "m.jsonl"], "'--inp'", None),  # no abbreviations: they change meaning as options come
        (["stray.jsonl"], "'stray.jsonl'", None),
    ],
)
def test_an_argument_that_is_no_option_stops_the_command_in_one_line(
    extra: list[str], names: str, suggestion: str | None, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "t"}\n')
    output = tmp_path / "out"
    assert main(["extract", "--input", str(manifest), "--output", str(output), *extra]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mmfeatures extract: error: unrecognized argument " + names)
    assert suggestion is None or suggestion in line
    assert not output.exists()


@pytest.mark.parametrize(
    "extra, says",
    [(["--fusion-dim", "wide"], "invalid int value: 'wide'"), (["--input"], "expected at least one argument")],
)
def test_a_malformed_option_stops_the_command_in_one_line(
    extra: list[str], says: str, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "t"}\n')
    assert main(["extract", "--output", str(tmp_path / "out"), "--input", str(manifest), *extra]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mmfeatures extract: error: ") and says in line


def test_every_value_after_input_is_an_input_as_a_shell_expanded_glob_gives_them(tmp_path) -> None:
    from mmfeatures.job import Job

    manifests = [tmp_path / "a.jsonl", tmp_path / "b.csv", tmp_path / "c.jsonl"]
    for manifest in manifests:
        manifest.write_text("id,text\nx,t\n" if manifest.suffix == ".csv" else '{"id": "x", "text": "t"}\n')
    argv = [
        "--input",
        str(manifests[0]),
        str(manifests[1]),
        "--output",
        str(tmp_path / "o"),
        "--input",
        str(manifests[2]),
    ]
    assert [source.path for source in Job.from_options(parse_options(argv)).inputs] == [str(m) for m in manifests]


def test_beams_own_options_pass_and_arguments_after_a_bare_separator_go_to_beam_unchecked(tmp_path) -> None:
    beam_options = [
        "--runner=FnApiRunner",
        "--project",
        "p",
        "--region=europe-west4",
        "--temp_location",
        "gs://bucket/tmp",
        "--sdk_container_image=image:1",
        "--experiments=use_runner_v2",
        "--setup_file=./setup.py",
        "--environment_type=LOOPBACK",
    ]
    argv = ["--input", "m.jsonl", "--output", "o", *beam_options, "--", "--flink_conf_dir=/etc/flink", "--whatever"]
    options = parse_options(argv)
    forwarded = options.get_all_options(retain_unknown_options=True)
    assert forwarded["project"] == "p" and forwarded["sdk_container_image"] == "image:1"
    assert forwarded["flink_conf_dir"] == "/etc/flink" and forwarded["whatever"] is True
    with pytest.raises(ConfigurationError, match="'--whatever'"):
        parse_options(["--input", "m.jsonl", "--output", "o", "--whatever"])


def test_an_input_no_reader_takes_is_refused_before_any_work(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    sheet = tmp_path / "data.xlsx"
    sheet.write_bytes(b"PK\x03\x04")
    output = tmp_path / "out"
    assert main(["extract", "--input", str(sheet), "--output", str(output)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cannot tell the format" in line and "data.xlsx" in line
    assert not output.exists()


def test_the_pipeline_module_refuses_unknown_arguments_in_one_line_too(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.extract_features", "--input", "m.jsonl", "--output", "o", "--bogus"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("extract_features: error: unrecognized argument '--bogus'")


# -- every option checked before any work -------------------------------------------------------
FLOAT32_OVERFLOW = "1e39"  # finite as a Python float, Inf as float32


@pytest.fixture
def memory_file() -> Iterator[str]:
    """A file on fsspec's memory:// store, removed afterwards."""
    location = f"memory://options-{uuid.uuid4().hex}/taken"
    fsspec.filesystem("memory").pipe(location, b"x")
    yield location
    fsspec.filesystem("memory").rm(location.rsplit("/", 1)[0], recursive=True)


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--output", "{file}"], "--output"),
        (["--output", "{file}/features"], "--output"),
        (["--output", "{memory_file}"], "--output"),
        (["--fusion-weights", f"text={FLOAT32_OVERFLOW}"], "--fusion_weights"),
        (["--fusion-weights", "text=abc"], "--fusion_weights"),
        (["--fusion-weights", "text=1,text=2"], "--fusion_weights"),
        (["--micro-batch-size", "100000"], "--micro_batch_size"),
        (["--micro-batch-size", "65"], "--micro_batch_size"),
        (["--device", "cuda", "--micro-batch-size", "1025"], "--micro_batch_size"),
        (["--fusion-dim", "0"], "--fusion_dim"),
        (["--fusion-dim", "-1"], "--fusion_dim"),
        (["--fusion", "mean", "--fusion-dim", "1000000000"], "--fusion_dim"),
        (["--fusion-seed", "-1"], "--fusion_seed"),
        (["--fusion-seed", str(2**63)], "--fusion_seed"),
        (["--text-batch-cost", "-5"], "--text_batch_cost"),
        (["--image-batch-cost", str(2**40)], "--image_batch_cost"),
        (["--max-audio-seconds", "nan"], "--max_audio_seconds"),
        (["--max-audio-seconds", "inf"], "--max_audio_seconds"),
        (["--max-audio-seconds", "0"], "--max_audio_seconds"),
        (["--max-audio-seconds", "-1"], "--max_audio_seconds"),
        (["--max-bytes", "0"], "--max_bytes"),
        (["--max-bytes", str(2**63)], "--max_bytes"),
        (["--max-pixels", "0"], "--max_pixels"),
        (["--max-text-chars", "-1"], "--max_text_chars"),
        (["--rows-per-file", "0"], "--rows_per_file"),
        (["--rows-per-file", "100000000"], "--rows_per_file"),
        (["--torch-threads", "100000"], "--torch_threads"),
        (["--model-copies", "1000"], "--model_copies"),
        (["--allowed-roots", " "], "--allowed_roots"),
    ],
)
def test_a_bad_option_stops_the_command_in_one_line_before_any_model_is_read(
    extra: list[str],
    option: str,
    memory_file: str,
    tmp_path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused with exit status 2 and one line naming the option, before a preprocessor reads its
    model's settings (and so before any model loads) and before the output folder exists."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "t"}\n')
    (tmp_path / "file").write_text("mine")
    monkeypatch.setattr(Preprocessor, "__init__", lambda *_: pytest.fail("a preprocessor was built"))
    output = tmp_path / "out"
    values = [value.format(file=tmp_path / "file", memory_file=memory_file) for value in extra]
    assert main(["extract", "--input", str(manifest), "--output", str(output), *values]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mmfeatures extract: error: ") and option in line
    assert not output.exists() and (tmp_path / "file").read_text() == "mine"


def test_the_output_is_checked_before_any_model(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "t"}\n')
    taken = tmp_path / "taken"
    taken.write_text("mine")
    argv = ["extract", "--input", str(manifest), "--output", str(taken), "--text-model", str(tmp_path / "nonexistent")]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--output" in line and "is a file" in line and "nonexistent" not in line


@pytest.mark.parametrize("extra", [[], ["--device", "cuda", "--micro-batch-size", "1024"], ["--fusion-seed", "7"]])
def test_the_widest_accepted_options_resolve(extra: list[str], tmp_path) -> None:
    from mmfeatures.job import Job

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "t"}\n')
    weights = f"text={np.finfo(np.float32).max},image=0"
    argv = ["--input", str(manifest), "--output", str(tmp_path / "new" / "out"), "--fusion-weights", weights, *extra]
    job = Job.from_options(parse_options(argv))
    assert job.fusion.weight("image") == 0.0 and not (tmp_path / "new").exists()
