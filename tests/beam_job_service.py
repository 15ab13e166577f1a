"""Beam's Python job service, except that it runs each job on as many workers per environment as
the job's ``--direct_num_workers`` asks, as a Flink or Spark job service asks its worker pool for
one per slot: ``python -m tests.beam_job_service --port PORT``.

Beam 2.77's own (``apache_beam.runners.portability.local_job_service_main``) runs every job on one
worker: its ``BeamJob`` calls ``FnApiRunner.run_via_runner_api``, and only ``run_pipeline`` reads
that option. Everything else is Beam's own servicer, unchanged.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.portability.api import beam_job_api_pb2
from apache_beam.runners.portability import local_job_service
from apache_beam.runners.portability.fn_api_runner import fn_runner


class WorkersAsAskedJob(local_job_service.BeamJob):
    """A job run on ``--direct_num_workers`` workers of each environment (1 without it)."""

    def _invoke_runner(self) -> fn_runner.RunnerResult:
        self.set_state(beam_job_api_pb2.JobState.RUNNING)
        options = self.pipeline_options()
        runner = fn_runner.FnApiRunner(provision_info=self._provision_info)
        # The options come through the job API as text.
        runner._num_workers = int(options.view_as(DirectOptions).direct_num_workers or 1)
        return runner.run_via_runner_api(self._pipeline_proto, options)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="The job API's port (on localhost).")
    port = parser.parse_args(argv).port
    logging.basicConfig(level=logging.INFO)
    servicer = local_job_service.LocalJobServicer(beam_job_type=WorkersAsAskedJob)
    servicer.start_grpc_server(port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # as Beam's own: the servicer stops on the way out
    try:
        while True:
            time.sleep(3600)
    finally:
        servicer.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
