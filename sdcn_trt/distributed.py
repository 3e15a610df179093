"""Batch jobs on a Ray cluster: one actor per GPU (or CPU worker), each holding one loaded pipeline.

The driver keeps the manifest (one writer) and the resume logic of `sdcn_trt.batch`; actors take
chunks of jobs, write their images atomically into the output folder — which every node must see
(a shared filesystem; on one machine, the local disk) — and return the manifest records. A chunk
whose actor dies is re-run on the restarted actor (Ray's task retries), then resubmitted by the
driver; after `max_retries` its jobs are recorded as failed.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from sdcn_trt.batch import Job, run_job
from sdcn_trt.errors import BackendUnavailableError

logger = logging.getLogger(__name__)


class BatchWorker:
    """Ray actor body: loads the pipeline once, then runs chunks of jobs."""

    def __init__(self, make_pipeline: Callable[[], Any], threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)  # Ray starts workers with one thread
        self.pipe = make_pipeline()

    def run(self, jobs: list[Job], input_root: str, output_root: str, save_control: bool) -> list[dict[str, Any]]:
        return [run_job(self.pipe, job, Path(input_root), Path(output_root), save_control) for job in jobs]


class RayRunner:
    """Feeds chunks of jobs to a pool of actors and yields their records as they finish."""

    def __init__(self, make_pipeline: Callable[[], Any], address: str | None = None, workers: int | None = None,
                 chunk_size: int = 4, max_retries: int = 2, gpus_per_worker: float | None = None,
                 threads: int | None = None):
        """`threads`: torch CPU threads per worker; by default the driver's own count, because CPU
        kernels split their sums by thread count and only equal counts give bit-identical images."""
        try:
            import ray
        except ImportError as exc:
            raise BackendUnavailableError("Ray is not installed: pip install 'sdcn_trt[ray]'") from exc
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=False)
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if gpus else 0.0
        count = workers or int(gpus // gpus_per_worker if gpus_per_worker else max(1, resources.get("CPU", 1)))
        # a worker that dies is restarted, and Ray re-runs its interrupted task on the new one
        actor = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_restarts=max_retries,
                           max_task_retries=max_retries)(BatchWorker)
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        self.actors = [actor.remote(make_pipeline, threads) for _ in range(count)]
        self.chunk_size, self.max_retries = chunk_size, max_retries
        logger.info("Ray: %d workers (%s GPU each) on %s", count, gpus_per_worker, address or "a local cluster")

    def map(self, jobs: list[Job], input_root: Path, output_root: Path, save_control: bool) -> Iterator[dict[str, Any]]:
        chunks = [jobs[i : i + self.chunk_size] for i in range(0, len(jobs), self.chunk_size)]
        idle = list(range(len(self.actors)))
        running: dict[Any, tuple[int, list[Job], int]] = {}  # ref -> (actor, chunk, attempt)
        queue = [(chunk, 0) for chunk in chunks]
        while queue or running:
            while queue and idle:
                chunk, attempt = queue.pop(0)
                index = idle.pop(0)
                ref = self.actors[index].run.remote(chunk, str(input_root), str(output_root), save_control)
                running[ref] = (index, chunk, attempt)
            ready, _ = self.ray.wait(list(running), num_returns=1)
            index, chunk, attempt = running.pop(ready[0])
            idle.append(index)
            try:
                records = self.ray.get(ready[0])
            except self.ray.exceptions.RayError as exc:
                if attempt < self.max_retries:
                    logger.warning("chunk of %d images failed on worker %d (%s); retrying", len(chunk), index, exc)
                    time.sleep(1.0 + attempt)  # let a restarting actor come back
                    queue.append((chunk, attempt + 1))
                    continue
                records = [{"key": j.key, "input": j.source, "seed": j.config.seed, "status": "failed",
                            "error": f"worker failed {attempt + 1} times: {type(exc).__name__}"} for j in chunk]
            yield from records

    def shutdown(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
