"""The worker image's Dockerfile, checked without Docker (no image can be pulled or built here):
everything it copies exists and is in the build context that ``.dockerignore`` leaves, it installs
with the script that tests/test_installed_package.py runs, and its base is Beam's SDK image of the
pinned apache-beam and of this Python.

The parser and the build-context rules here are also what test_installed_package.py uses to build
its wheel from the files that the image's wheel stage receives.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
INSTALL_SCRIPT = "scripts/install_worker.sh"
BEAM_BOOT = "/opt/apache/beam/boot"  # the SDK image's entry point, which starts a Beam SDK worker
BEAM_SDK_IMAGE = re.compile(r"^apache/beam_python(?P<python>\d+\.\d+)_sdk:(?P<beam>\S+)$")
BYTE_CODE = ("__pycache__", ".pyc")  # made by running the code, never copied


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    arguments: str  # continuation lines joined
    stage: int  # the build stage it belongs to, counted from 0; -1 before the first FROM


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    destination: str
    from_stage: str | None  # --from: copied out of another stage or image, not the build context
    stage: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and blank lines left out."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops these inside a continued instruction too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), arguments.strip(), stage))
    if pending:
        raise ValueError("the Dockerfile ends inside a continued instruction")
    return instructions


@cache
def instructions() -> tuple[Instruction, ...]:
    return tuple(parse_dockerfile(DOCKERFILE.read_text("utf-8")))


def _split_copy(instruction: Instruction) -> Copy:
    words = instruction.arguments.split()
    flags = []
    while words and words[0].startswith("--"):
        flags.append(words.pop(0))
    rest = " ".join(words)
    paths = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    from_stage = next((flag.split("=", 1)[1] for flag in flags if flag.startswith("--from=")), None)
    return Copy(tuple(paths[:-1]), paths[-1], from_stage, instruction.stage)


def copies() -> list[Copy]:
    return [_split_copy(i) for i in instructions() if i.keyword in ("COPY", "ADD")]


def stage_names() -> dict[str, int]:
    """Each named stage (``FROM ... AS name``) and its number."""
    names = {}
    for instruction in instructions():
        words = instruction.arguments.split()
        if instruction.keyword == "FROM" and len(words) == 3 and words[1].upper() == "AS":
            names[words[2]] = instruction.stage
    return names


def final_stage() -> int:
    return instructions()[-1].stage


def global_args() -> dict[str, str]:
    """The ARGs declared before the first FROM, with their defaults: what FROM lines may use."""
    found = {}
    for instruction in instructions():
        if instruction.keyword == "ARG" and instruction.stage == -1:
            name, _, default = instruction.arguments.partition("=")
            found[name] = default
    return found


def base_image(stage: int) -> str:
    """The image a stage starts from, with the global ARGs' defaults put in."""
    line = next(i for i in instructions() if i.keyword == "FROM" and i.stage == stage)
    image = line.arguments.split()[0]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args()[m.group(1) or m.group(2)], image)


# -- the build context: what .dockerignore leaves for COPY --------------------------------------
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go's filepath.Match plus ``**``) as a regular expression, for the
    parts this project's .dockerignore uses: ``*``, ``?``, ``**`` and literal characters."""
    if any(c in pattern for c in "[]\\"):
        raise NotImplementedError(f".dockerignore pattern {pattern!r}: character classes and escapes are not handled")
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        else:
            regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(regex)


@cache
def ignore_rules() -> tuple[tuple[re.Pattern[str], bool], ...]:
    """(pattern, excludes) in file order, cleaned as Docker cleans them (no trailing or leading /)."""
    rules = []
    for line in DOCKERIGNORE.read_text("utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((_pattern_regex(pattern), not keep))
    return tuple(rules)


def excluded_from_context(relative: str) -> bool:
    """Whether .dockerignore keeps ``relative`` (a path under the repository) out of the build
    context: the last pattern that matches the path or one of its parent folders decides."""
    parts = PurePosixPath(relative).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for regex, excludes in ignore_rules():
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = excludes
    return excluded


def context_files(source: str) -> list[str]:
    """The files one COPY source names (a file, a folder, or a pattern), relative to the repository."""
    matches = sorted(REPO.glob(source.rstrip("/"))) if any(c in source for c in "*?[") else [REPO / source]
    files = []
    for match in matches:
        if match.is_dir():
            files += [str(p.relative_to(REPO)) for p in sorted(match.rglob("*")) if p.is_file()]
        elif match.is_file():
            files.append(str(match.relative_to(REPO)))
    return files


def byte_code(relative: str) -> bool:
    return BYTE_CODE[0] in PurePosixPath(relative).parts or relative.endswith(BYTE_CODE[1])


def copy_stage_sources(stage_name: str, target: Path) -> None:
    """Lay out in ``target`` (the stage's WORKDIR) what the stage's COPY instructions put there,
    from the build context as .dockerignore leaves it (files and folders; patterns are not handled)."""
    stage = stage_names()[stage_name]
    for copy in copies():
        if copy.stage != stage or copy.from_stage is not None:
            continue
        for source in copy.sources:
            if any(c in source for c in "*?["):
                raise NotImplementedError(f"COPY {source}: patterns are not handled")
            root = Path(source.rstrip("/"))
            for relative in context_files(source):
                if excluded_from_context(relative):
                    continue
                # A folder's contents go into the destination; a file goes into it by its name.
                inside = Path(relative).relative_to(root) if (REPO / root).is_dir() else Path(root.name)
                destination = target / copy.destination / inside
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / relative, destination)


def wheel_stage_command() -> list[str]:
    """The wheel stage's one RUN command, as words."""
    runs = [i.arguments for i in instructions() if i.keyword == "RUN" and i.stage == stage_names()["wheel"]]
    assert len(runs) == 1, "the wheel stage must build the wheel in one RUN"
    return shlex.split(runs[0])


# -- the checks --------------------------------------------------------------------------------
def test_everything_the_dockerfile_copies_exists_and_is_in_the_build_context() -> None:
    from_context = [copy for copy in copies() if copy.from_stage is None]
    assert from_context, "the Dockerfile copies nothing from the build context"
    for copy in from_context:
        for source in copy.sources:
            files = [f for f in context_files(source) if not byte_code(f)]
            assert files, f"COPY {source}: nothing in the repository matches it"
            left_out = [f for f in files if excluded_from_context(f)]
            assert not left_out, f"COPY {source}: .dockerignore leaves {left_out} out of the build context"


def test_what_the_build_context_leaves_out() -> None:
    """Virtual environments (several GB), outputs, caches and byte code stay out of the context,
    and the rules above tell those from what is copied."""
    for path in (".venv/bin/python", ".git/HEAD", "out/local/_run.json", "sample_data/manifest.jsonl"):
        assert excluded_from_context(path), f"{path} would be sent to the Docker daemon"
    assert excluded_from_context("mmfeatures/__pycache__/cli.cpython-311.pyc")
    assert not excluded_from_context("mmfeatures/cli.py")
    assert not excluded_from_context(INSTALL_SCRIPT)


def test_copies_from_other_stages_name_a_stage_of_this_file() -> None:
    for copy in copies():
        if copy.from_stage is not None:
            assert copy.from_stage in stage_names(), f"COPY --from={copy.from_stage}: no such stage"
            assert stage_names()[copy.from_stage] < copy.stage


def test_the_wheel_stage_builds_the_wheel_as_a_checkout_does() -> None:
    """``pip wheel --no-deps`` of the copied sources, into the folder the final stage takes."""
    command = wheel_stage_command()
    assert command[:4] == ["python", "-m", "pip", "wheel"] and "--no-deps" in command and command[-1] == "."
    wheel_dir = command[command.index("--wheel-dir") + 1]
    taken = [c for c in copies() if c.from_stage == "wheel"]
    assert [c.sources for c in taken] == [(wheel_dir + "/",)], "the final stage must take the built wheel folder"
    wheel = stage_names()["wheel"]
    copied = {source.rstrip("/") for copy in copies() if copy.stage == wheel for source in copy.sources}
    # What setup.py reads, and the folders it packages
    assert {"setup.py", "README.md", "requirements.txt", "mmfeatures", "pipelines", "schemas"} <= copied


def test_the_image_installs_with_the_script_the_wheel_test_runs() -> None:
    final = final_stage()
    script = [c for c in copies() if c.stage == final and c.sources == (INSTALL_SCRIPT,)]
    assert len(script) == 1, f"the final stage must copy {INSTALL_SCRIPT} once"
    wheels = [c for c in copies() if c.stage == final and c.from_stage == "wheel"]
    assert len(wheels) == 1, "the final stage must take the wheel stage's wheel"
    runs = [shlex.split(i.arguments) for i in instructions() if i.keyword == "RUN" and i.stage == final]
    installs = [words for words in runs if script[0].destination in words]
    assert len(installs) == 1, f"one RUN must run {script[0].destination}"
    words = installs[0]
    position = words.index(script[0].destination)
    assert words[position - 1] == "bash"
    wheel_argument = PurePosixPath(words[position + 1])
    assert wheel_argument.parent == PurePosixPath(wheels[0].destination)
    assert wheel_argument.match("mmfeatures-*.whl")
    environment = dict(word.split("=", 1) for word in words[: position - 1])
    assert environment["PYTHON"] == "python"  # the SDK image's interpreter, the one its boot runs
    assert environment["TORCH_VARIANT"] == "${TORCH_VARIANT}"
    assert environment["TORCH_INDEX_URL"] == "${TORCH_INDEX_URL}"
    stage_args = {
        name: default
        for name, _, default in (
            i.arguments.partition("=") for i in instructions() if i.keyword == "ARG" and i.stage == final
        )
    }
    assert stage_args["TORCH_VARIANT"] == "cpu"
    assert stage_args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"


def test_the_image_keeps_the_sdk_entry_point() -> None:
    entry_points = [i for i in instructions() if i.keyword == "ENTRYPOINT"]
    assert entry_points, "the SDK image's entry point must stay (and be stated, for other bases)"
    assert entry_points[-1].stage == final_stage()
    assert json.loads(entry_points[-1].arguments) == [BEAM_BOOT]


def test_the_base_image_is_beam_sdk_of_the_pinned_beam_and_this_python() -> None:
    pins = re.findall(r"^apache-beam(?:\[[^\]]*\])?==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    assert len(pins) == 1, "requirements.txt must pin apache-beam once"
    python_requires = re.search(r'python_requires="([^"]+)"', (REPO / "setup.py").read_text())
    assert python_requires is not None
    for stage in range(final_stage() + 1):
        image = BEAM_SDK_IMAGE.match(base_image(stage))
        assert image is not None, f"stage {stage} starts from {base_image(stage)}, not a Beam Python SDK image"
        assert image["beam"] == pins[0], f"the SDK image is Beam {image['beam']}, requirements.txt pins {pins[0]}"
        assert image["python"] in SpecifierSet(python_requires.group(1))
        # Beam's workers unpickle what the launching Python pickled: their minor versions must agree.
        assert image["python"] == f"{sys.version_info.major}.{sys.version_info.minor}", (
            f"the image runs Python {image['python']}; jobs are launched from Python {sys.version.split()[0]}"
        )


@pytest.mark.parametrize(
    ("environment", "arguments", "message"),
    [
        ({}, [], "usage:"),
        ({"TORCH_VARIANT": "rocm6"}, ["mmfeatures-0.1.0-py3-none-any.whl"], "TORCH_VARIANT must be cpu"),
    ],
)
def test_the_install_script_refuses_before_installing(
    environment: dict[str, str], arguments: list[str], message: str, tmp_path: Path
) -> None:
    """A wrong call stops before pip runs (PYTHON names no interpreter, so reaching pip would fail
    otherwise)."""
    env = {**os.environ, "PYTHON": str(tmp_path / "no-python"), **environment}
    proc = subprocess.run(
        ["bash", str(REPO / INSTALL_SCRIPT), *arguments], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
