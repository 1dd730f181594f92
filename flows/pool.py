"""Sweep trials as flow runs of a deployment on a work pool (`sweep.deployment`, e.g. `training-pipeline/manual`):
each trial runs where a nightly run runs, on the pool's workers (several machines on one bucket, Kubernetes), and
writes its record into the shared store, which the driver reads."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeps.state import SweepFiles

FINAL_OK = "COMPLETED"


@dataclass
class PoolTrial:
    """A trial's flow run (`log_path` names it: a pool trial's log is the flow run's, in the Prefect UI)."""

    number: int
    flow_run_id: Any
    log_path: Path


@dataclass
class PoolLauncher:
    """Start trials as flow runs of `deployment`, poll them, cancel them when the driver fails."""

    deployment: str
    files: SweepFiles
    invocation: str
    poll_seconds: float = 2.0

    def start(self, number: int) -> PoolTrial:
        """Create trial `number`'s flow run (the trial's config as the run's `config`, so the UI shows it)."""
        from prefect.deployments import run_deployment

        record = self.files.trial(number)
        assert record is not None
        ticket = {"artifacts": str(self.files.store.root), "sweep": self.files.name, "number": number,
                  "invocation": self.invocation}
        run = run_deployment(self.deployment, parameters={"config": record.config, "trial": ticket}, timeout=0,
                             as_subflow=False, flow_run_name=f"{self.files.name}-trial-{number}")
        return PoolTrial(number, run.id, Path(f"flow run {run.id} of {self.deployment}"))

    def wait_any(self, running: dict[int, PoolTrial]) -> tuple[int, int]:
        """(trial number, 0 when its flow run completed, else 1) of the first of `running` to end."""
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while True:
                for number, trial in running.items():
                    state = client.read_flow_run(trial.flow_run_id).state
                    if state is not None and state.is_final():
                        return number, 0 if state.type.value == FINAL_OK else 1
                time.sleep(self.poll_seconds)

    def stop_all(self, running: dict[int, PoolTrial]) -> None:
        """Cancel every running trial's flow run (each resumes from its checkpoint next time)."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelling

        with get_client(sync_client=True) as client:
            for trial in running.values():
                client.set_flow_run_state(trial.flow_run_id, Cancelling(), force=True)


    def close(self) -> None:
        """Nothing outlives its flow run here."""

def pool_launcher(config: Any, files: SweepFiles, invocation: str) -> PoolLauncher:
    """Trials as flow runs of `sweep.deployment`."""
    return PoolLauncher(config.sweep.deployment, files, invocation)
