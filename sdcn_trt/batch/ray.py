"""Batch jobs on a Ray cluster: one actor per GPU (or CPU worker), each holding one loaded pipeline.

The driver keeps the manifest (one writer) and the resume logic of `sdcn_trt.batch.local`; actors take
chunks of jobs, write their images atomically into the output folder — which every node must see
(a shared filesystem; on one machine, the local disk) — and return the manifest records. Ray does
the bookkeeping: `ray.util.ActorPool` hands chunks to idle actors, and an actor that dies is
restarted with its interrupted chunk re-run (`max_restarts` / `max_task_retries`); a chunk that
still fails after `max_retries` has its jobs recorded as failed.
"""
from __future__ import annotations

import logging
import re
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

from sdcn_trt.batch.local import Job, run_jobs
from sdcn_trt.errors import BackendUnavailableError, InputError

logger = logging.getLogger(__name__)


class BatchWorker:
    """Ray actor body: loads the pipeline once, then runs chunks of jobs."""

    def __init__(self, make_pipeline: Callable[[], Any], threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)  # Ray starts workers with one thread
        self.pipe = make_pipeline()

    def run(self, jobs: list[Job], input_root: str, output_root: str, save_control: bool,
            batch_size: int = 1) -> list[dict[str, Any]]:
        """A chunk's records; with batch_size > 1 its jobs of one size and settings share network calls."""
        return list(run_jobs(self.pipe, jobs, Path(input_root), Path(output_root), save_control, batch_size))


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """InputError when a cluster address (HOST:PORT or ray://HOST:PORT) takes no connection: Ray itself
    retries such an address for minutes. Other spellings ("auto", "local") are left to Ray."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address)
    if not match:
        return
    try:
        socket.create_connection((match[1], int(match[2])), timeout=timeout).close()
    except OSError as exc:
        raise InputError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one there "
                         "(ray start --head) or leave out --ray-address for a local cluster") from exc


class RayRunner:
    """Feeds chunks of jobs to a pool of actors and yields their records as they finish."""

    def __init__(self, make_pipeline: Callable[[], Any], address: str | None = None, workers: int | None = None,
                 chunk_size: int = 4, max_retries: int = 2, gpus_per_worker: float | None = None,
                 threads: int | None = None):
        """`threads`: torch CPU threads per worker; by default the driver's own count, because CPU
        kernels split their sums by thread count and only equal counts give bit-identical images."""
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise InputError(f"workers must be an integer >= 1 or None (one per GPU, else one per CPU), got {workers!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise InputError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        try:
            import ray
        except ImportError as exc:
            raise BackendUnavailableError("Ray is not installed: pip install 'sdcn_trt[ray]'") from exc
        self.ray = ray
        if address and not ray.is_initialized():
            check_reachable(address)
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

    def map(self, jobs: list[Job], input_root: Path, output_root: Path, save_control: bool,
            batch_size: int = 1) -> Iterator[dict[str, Any]]:
        """Records of `jobs` as chunks finish (in no fixed order); jobs of chunks that failed on
        every try come last, as failed records. Actors batch inside a chunk, so a chunk holds at least
        `batch_size` jobs."""
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        chunk_size = max(self.chunk_size, batch_size)
        for i in range(0, len(jobs), chunk_size):
            pool.submit(lambda actor, chunk: actor.run.remote(chunk, str(input_root), str(output_root), save_control,
                                                              batch_size),
                        jobs[i : i + chunk_size])
        unfinished = {job.key: job for job in jobs}
        errors: list[str] = []
        while pool.has_next():  # false too once every actor is dead: their chunks stay unfinished
            try:
                records = pool.get_next_unordered()
            except self.ray.exceptions.RayError as exc:
                logger.warning("a chunk failed after %d retries: %s", self.max_retries, type(exc).__name__)
                errors.append(type(exc).__name__)
                continue
            for record in records:
                unfinished.pop(record["key"], None)
            yield from records
        why = (f"no result from Ray: its chunk failed {self.max_retries + 1} times, or no live worker was left to run it "
               f"(errors: {', '.join(sorted(set(errors))) or 'none'})")
        for job in unfinished.values():
            yield {"key": job.key, "input": job.source, "seed": job.config.seed, "status": "failed", "error": why}

    def shutdown(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
