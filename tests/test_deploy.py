"""The deployment files and docs/cluster.md agree with the job they launch.

Nothing here runs on a cluster: these tests keep what cannot be run on this machine (a Dataflow Flex
Template, an Airflow DAG, the runner commands of docs/cluster.md) from drifting away from the job's
options. Each is checked against the job's own option parsing: the options ``ExtractOptions``
defines, with Beam's, as ``parse_options`` accepts them.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apache_beam.options.pipeline_options import StandardOptions

from mmfeatures.errors import ConfigurationError
from mmfeatures.job import Job
from mmfeatures.options import ExtractOptions, check_options, parse_options

REPO = Path(__file__).resolve().parents[1]
METADATA = REPO / "deploy" / "flex-template" / "metadata.json"
DAG_FILE = REPO / "deploy" / "airflow" / "mmfeatures_daily.py"
CLUSTER_DOC = REPO / "docs" / "cluster.md"
# Fenced blocks of the page whose lines are commands: shell, and crontab lines (five time fields first).
COMMAND_BLOCKS = ("bash", "crontab")
# The runners docs/cluster.md shows a command for, each of which must be there.
DOCUMENTED_RUNNERS = {"DataflowRunner", "PortableRunner", "FlinkRunner", "SparkRunner"}
SHELL_OPERATOR_CHARS = set("();<>|&")


def _job_options() -> dict[str, argparse.Action]:
    """The job's own options, by name, as ``ExtractOptions`` adds them to a parser."""
    parser = argparse.ArgumentParser(add_help=False)
    ExtractOptions._add_argparse_args(parser)
    return {action.dest: action for action in parser._actions}


def _metadata_parameters() -> list[dict[str, Any]]:
    metadata = json.loads(METADATA.read_text())
    assert metadata["name"] and metadata["description"]
    return metadata["parameters"]


def _parsed(argv: list[str]) -> Any:
    """``argv`` as the job reads it: its options and Beam's, refused in one line if any is neither,
    then range-checked. Returns the job's view of the options."""
    options = parse_options(argv)
    extract = options.view_as(ExtractOptions)
    check_options(extract)
    return options


def _required_options(folder: Path) -> set[str]:
    """The options the job refuses to run without, found by asking it: each run of ``Job.from_options``
    names the first one missing, which is then given, until it fails for another reason (the input
    given here matches no file) or succeeds."""
    argv: list[str] = []
    required: set[str] = set()
    while True:
        try:
            Job.from_options(parse_options(argv))
        except ConfigurationError as exc:
            missing = re.match(r"--([\w-]+) is required", str(exc))
            if missing is None:
                return required
            name = missing.group(1).replace("-", "_")
            assert name not in required, f"--{name} given, yet still reported missing"
            required.add(name)
            argv += [f"--{name}", str(folder / name)]
        else:
            return required


# -- (a) the Flex Template's metadata ---------------------------------------------------------------------
def test_the_templates_parameters_are_exactly_the_jobs_options_in_the_spelling_it_parses() -> None:
    parameters, options = _metadata_parameters(), _job_options()
    names = [parameter["name"] for parameter in parameters]
    assert len(names) == len(set(names)), "a parameter is declared twice"
    assert set(names) == set(options)
    for name in names:
        # The launcher passes --NAME=VALUE: NAME must be a flag of the job's parser as written.
        assert f"--{name}" in options[name].option_strings


def test_each_parameters_help_is_the_options_help() -> None:
    options = _job_options()
    for parameter in _metadata_parameters():
        help_text = options[parameter["name"]].help
        assert help_text, f"--{parameter['name']} has no help text in mmfeatures/options.py"
        assert parameter["helpText"].startswith(help_text), parameter["name"]
        assert parameter["label"].strip(), parameter["name"]


def test_the_required_parameters_are_the_options_the_job_cannot_run_without(tmp_path: Path) -> None:
    required = _required_options(tmp_path)
    assert required, "the job ran without any option: nothing is required?"
    declared = {parameter["name"] for parameter in _metadata_parameters() if not parameter.get("isOptional", False)}
    assert declared == required


def test_the_parameters_regexes_accept_only_values_the_job_accepts() -> None:
    """A regex lets the console check a value before launching: it must accept the option's default
    and choices, and nothing the job would refuse; every option with choices or a number type has one."""
    options = _job_options()
    for parameter in _metadata_parameters():
        name = parameter["name"]
        action = options[name]
        regexes = [re.compile(pattern) for pattern in parameter.get("regexes", [])]
        if action.choices or action.type in (int, float) or action.nargs == "?":  # "?": an on/off switch
            assert regexes, f"{name}: no regex, though the job accepts only some values"
        if not regexes:
            continue
        must_match = [str(choice) for choice in action.choices or []]
        if action.default is not None:
            must_match.append(str(action.default))
        for value in must_match:
            assert all(regex.fullmatch(value) for regex in regexes), f"{name}: its regexes refuse {value!r}"
        for value in ("bogus", "-1", "1.5", "12", "", "cpu", "fp32", "concat", "1e3", "true", "False", "yes"):
            if all(regex.fullmatch(value) for regex in regexes):
                try:
                    _parsed([f"--{name}={value}"])
                except ConfigurationError as exc:
                    pytest.fail(f"{name}: its regexes let {value!r} through, which the job refuses: {exc}")


# -- (b) the Airflow DAG ----------------------------------------------------------------------------------
def _dag_operator_arguments() -> dict[str, Any]:
    """The keyword arguments of the DAG's one ``BeamRunPythonPipelineOperator``, their values
    evaluated as literals, names resolved from the module's literal assignments (Airflow is not
    installed here, so the file is parsed, not imported)."""
    module = ast.parse(DAG_FILE.read_text(), filename=str(DAG_FILE))
    constants: dict[str, Any] = {}
    for statement in module.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
            if isinstance(target, ast.Name):
                try:
                    constants[target.id] = ast.literal_eval(statement.value)
                except ValueError:
                    pass
    calls = [
        node
        for node in ast.walk(module)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "BeamRunPythonPipelineOperator"
    ]
    assert len(calls) == 1, f"{DAG_FILE.name} should run one BeamRunPythonPipelineOperator, not {len(calls)}"
    arguments: dict[str, Any] = {}
    for keyword in calls[0].keywords:
        assert keyword.arg is not None, "no **kwargs: every argument is to be checked"
        if isinstance(keyword.value, ast.Name) and keyword.value.id in constants:
            arguments[keyword.arg] = constants[keyword.value.id]
        else:
            try:
                arguments[keyword.arg] = ast.literal_eval(keyword.value)
            except ValueError:
                arguments[keyword.arg] = keyword.value  # e.g. a timedelta: not an option
    return arguments


def _beam_options_to_args(options: dict[str, Any]) -> list[str]:
    """Pipeline options as the Beam provider's ``beam_options_to_args`` passes them: True or None a
    bare flag, False left out, a list one flag per item, anything else ``--KEY=VALUE``."""
    args: list[str] = []
    for key, value in options.items():
        if value is None or value is True:
            args.append(f"--{key}")
        elif value is False:
            continue
        elif isinstance(value, list):
            args.extend(f"--{key}={item}" for item in value)
        else:
            args.append(f"--{key}={value}")
    return args


def _rendered(value: Any) -> Any:
    """``value`` with each Jinja template (an Airflow Variable) replaced by a placeholder value."""
    if isinstance(value, str):
        return re.sub(r"\{\{.*?\}\}", "PLACEHOLDER", value)
    if isinstance(value, dict):
        return {key: _rendered(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rendered(item) for item in value]
    return value


def test_the_dag_file_is_python() -> None:
    ast.parse(DAG_FILE.read_text(), filename=str(DAG_FILE))


def test_the_dag_runs_the_jobs_entry_point() -> None:
    arguments = _dag_operator_arguments()
    py_file = arguments["py_file"]
    if "-m" in arguments.get("py_options", []):
        path = REPO / (py_file.replace(".", "/") + ".py")
    else:
        path = REPO / py_file
    assert path.is_file(), f"the DAG runs {py_file}, which is not in the repository"
    assert path == REPO / "pipelines" / "extract_features.py"


def test_the_dags_options_are_an_incremental_run_on_one_output_that_the_job_accepts() -> None:
    arguments = _dag_operator_arguments()
    options = _rendered(arguments["pipeline_options"])
    assert options.get("incremental") is True
    assert options.get("output"), "a scheduled incremental run needs one stable --output"
    argv = [f"--runner={arguments['runner']}", *_beam_options_to_args(options)]
    if arguments["runner"] == "DataflowRunner":  # what the operator adds from dataflow_config
        config = _rendered(arguments["dataflow_config"])
        argv += [
            f"--project={config['project_id']}",
            f"--region={config['location']}",
            f"--job_name={config['job_name']}",
            "--labels=airflow-version=v2-10-0",
        ]
    parsed = _parsed(argv)
    extract = parsed.view_as(ExtractOptions)
    assert extract.incremental is True and extract.output == options["output"]
    assert parsed.view_as(StandardOptions).runner == arguments["runner"]


# -- (c) the commands of docs/cluster.md ------------------------------------------------------------------
def _command_blocks(text: str) -> Iterator[str]:
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        if match.group(1) in COMMAND_BLOCKS:
            yield match.group(2)


def _commands(block: str) -> Iterator[list[str]]:
    """Each command of a block as the shell splits it into words (continuation lines joined,
    comments dropped, operators such as ``>>`` and ``&&`` words of their own)."""
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        if words:
            yield words


def _is_operator(word: str) -> bool:
    return bool(word) and set(word) <= SHELL_OPERATOR_CHARS


def _job_arguments(words: list[str]) -> list[str] | None:
    """The arguments a command gives the job, if it runs the job (``mmfeatures extract`` or
    ``python -m pipelines.extract_features``, by any path): the words after the entry point, up to
    the first shell operator (a redirect's file descriptor number left out)."""
    names = [Path(word).name for word in words]
    start = None
    for i in range(len(words)):
        if names[i : i + 2] == ["mmfeatures", "extract"]:
            start = i + 2
        elif names[i].startswith("python") and words[i + 1 : i + 3] == ["-m", "pipelines.extract_features"]:
            start = i + 3
        if start is not None:
            break
    if start is None:
        return None
    arguments: list[str] = []
    for word in words[start:]:
        if _is_operator(word):
            if arguments and arguments[-1].isdigit() and word[0] in "<>":
                arguments.pop()
            break
        arguments.append(word)
    return arguments


def _gcloud_parameters(words: list[str]) -> list[tuple[str, str]]:
    """The ``--parameters`` of ``gcloud dataflow flex-template run``, split as gcloud splits a
    dictionary flag: at commas, or at the delimiter a leading ``^D^`` names; each KEY=VALUE at its
    first '='."""
    values: list[str] = []
    for i, word in enumerate(words):
        if word.startswith("--parameters="):
            values.append(word.split("=", 1)[1])
        elif word == "--parameters":
            values.append(words[i + 1])
    pairs: list[tuple[str, str]] = []
    for value in values:
        delimiter = ","
        custom = re.match(r"\^(.+?)\^", value)
        if custom:
            delimiter, value = custom.group(1), value[custom.end() :]
        for item in value.split(delimiter):
            key, separator, item_value = item.partition("=")
            assert separator, f"gcloud parameter {item!r} is not KEY=VALUE"
            pairs.append((key, item_value))
    return pairs


def _documented_commands() -> list[list[str]]:
    return [words for block in _command_blocks(CLUSTER_DOC.read_text()) for words in _commands(block)]


def test_every_job_command_in_the_cluster_page_uses_only_options_the_job_accepts() -> None:
    runners: set[str] = set()
    checked = 0
    for words in _documented_commands():
        arguments = _job_arguments(words)
        if arguments is None:
            continue
        command = " ".join(words)
        try:
            options = _parsed(arguments)
        except ConfigurationError as exc:
            pytest.fail(f"docs/cluster.md: the job refuses\n  {command}\n{exc}")
        runners.add(str(options.view_as(StandardOptions).runner))
        checked += 1
    assert checked, "no command of docs/cluster.md runs the job: did the page's fences change?"
    assert DOCUMENTED_RUNNERS <= runners, f"no command for {sorted(DOCUMENTED_RUNNERS - runners)}"


def test_the_cluster_pages_flex_template_commands_use_the_repositorys_files_and_valid_parameters() -> None:
    names = {parameter["name"] for parameter in _metadata_parameters()}
    launches = builds = 0
    for words in _documented_commands():
        if words[:3] != ["gcloud", "dataflow", "flex-template"]:
            continue
        if words[3] == "build":
            builds += 1
            (metadata,) = [word.split("=", 1)[1] for word in words if word.startswith("--metadata-file=")]
            assert REPO / metadata == METADATA
        elif words[3] == "run":
            launches += 1
            parameters = _gcloud_parameters(words)
            assert {"input", "output"} <= {key for key, _ in parameters}
            argv = [f"--{key}={value}" for key, value in parameters]
            try:
                _parsed(argv)  # a job option, or a Beam option the launcher passes on
            except ConfigurationError as exc:
                pytest.fail(f"docs/cluster.md: the template launch passes {argv}, which the job refuses: {exc}")
            for key, _ in parameters:
                assert key in names or key not in _job_options(), key
    assert builds and launches, "docs/cluster.md shows no Flex Template build and run"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("mmfeatures extract --input a --output b", ["--input", "a", "--output", "b"]),
        (".venv/bin/python -m pipelines.extract_features --input 'a b' --x=1 && echo", ["--input", "a b", "--x=1"]),
        ("30 2 * * * /opt/v/bin/mmfeatures extract --output o >>/var/log/m.log 2>&1", ["--output", "o"]),
        ("python -m apache_beam.runners.portability.local_job_service_main --port 8099 &", None),
        ("docker run IMAGE --worker_pool  # a comment", None),
    ],
)
def test_the_job_arguments_of_a_command_line(line: str, expected: list[str] | None) -> None:
    (words,) = list(_commands(line))
    assert _job_arguments(words) == expected


def test_a_refused_option_in_a_documented_command_is_caught() -> None:
    """The docs check fails on what it is there to catch: a misspelt option, a runner option of the
    wrong spelling, a value out of the job's range."""
    for arguments in (["--incremantal"], ["--flink-master=h:8081"], ["--flink_version=1.18"], ["--fusion_dim=0"]):
        with pytest.raises(ConfigurationError):
            _parsed(["--input", "a", "--output", "b", *arguments])
