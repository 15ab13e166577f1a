# The feature job's worker image: Beam's Python SDK container with mmfeatures, its pinned
# requirements and the default models' weights installed, so that workers start without installing
# or downloading anything. Built from the repository root:
#   docker build -t mmfeatures-worker .                                          # CPU torch
#   docker build --build-arg TORCH_VARIANT=cu128 -t mmfeatures-worker:cu128 .    # CUDA torch
# Launch the job with --sdk_container_image=IMAGE (Dataflow; --environment_type=DOCKER
# --environment_config=IMAGE on Flink and Spark) and without --setup_file or --requirements_file.
# The base must stay a Beam SDK image of requirements.txt's apache-beam and of the Python that
# launches the job; tests/test_worker_image.py checks both.
ARG BASE_IMAGE=apache/beam_python3.11_sdk:2.77.0

# The wheel, built as `pip wheel --no-deps -w dist .` builds it in a checkout, from the files that
# setup.py reads and packages.
FROM ${BASE_IMAGE} AS wheel
WORKDIR /src
COPY setup.py MANIFEST.in README.md requirements.txt ./
COPY mmfeatures/ mmfeatures/
COPY pipelines/ pipelines/
COPY schemas/ schemas/
RUN python -m pip wheel --no-deps --wheel-dir /dist .

FROM ${BASE_IMAGE}
# cpu, or a CUDA build of torch that PyTorch publishes for setup.py's pin (cu128, say): the only
# argument a CUDA image needs. PyPI's torch for Linux is itself a CUDA build, so even the CPU image
# takes torch from PyTorch's index for its variant.
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
COPY scripts/install_worker.sh /tmp/mmfeatures/install_worker.sh
COPY --from=wheel /dist/ /tmp/mmfeatures/dist/
# The script the installed-package test runs. It ends by loading every default model offline, so
# an image that could not embed fails to build. No pip cache: it would only add to the image.
RUN PIP_NO_CACHE_DIR=1 PYTHON=python TORCH_VARIANT="${TORCH_VARIANT}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
        bash /tmp/mmfeatures/install_worker.sh /tmp/mmfeatures/dist/mmfeatures-*.whl \
    && rm -rf /tmp/mmfeatures
# The SDK image's own: the boot program that starts a Beam SDK worker.
ENTRYPOINT ["/opt/apache/beam/boot"]
