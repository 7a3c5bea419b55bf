"""The Dask worker plugin of ``runner.kind=dask`` (imported only when a cluster is used: Dask stays optional
at import time for the CLI and the flows)."""

from __future__ import annotations

import logging
import os

from distributed.diagnostics.plugin import WorkerPlugin

PLUGIN_NAME = "embedding-distill-worker-setup"


class WorkerSetup(WorkerPlugin):
    """A Dask worker plugin: the flow run's environment (Prefect API, MLflow store) and torch threads.

    Runs on every worker of the cluster, present and future (``Client.register_plugin``).
    """

    name = PLUGIN_NAME

    def __init__(self, env: dict[str, str], torch_threads: int) -> None:
        self.env = env
        self.torch_threads = torch_threads

    def setup(self, worker: object) -> None:
        logging.getLogger("distributed").setLevel(logging.WARNING)  # start / stop chatter of each worker
        os.environ.update(self.env)
        import torch

        torch.set_num_threads(self.torch_threads)
        if "MLFLOW_TRACKING_URI" in self.env:
            import mlflow

            mlflow.set_tracking_uri(self.env["MLFLOW_TRACKING_URI"])
