"""`covidct batch --ray`: the batch's cases analysed by Ray actors (https://docs.ray.io), on one machine or a cluster.

Each actor (`CaseWorker`) loads the model once and analyses the cases sent to it, one at a time, with
`batch.analyse_case`, the plain batch's own path: it reads the case on its node (cases are paths on storage
every node sees) and writes the case's result folder atomically. The driver hands out cases, collects the
outcomes and reports progress; `batch.run_batch` writes summary.csv. A worker process that dies mid-case
(killed, out of memory, its node lost) has that case retried once, on a new actor; a case whose worker dies
twice is recorded as failed. Ray is an optional extra (`pip install 'covidct-diagnosis[ray]'`), imported
only here, only when a batch runs on Ray.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .batch import Case, CaseOutcome, analyse_case, discard_case_leftovers
from .errors import UsageError
from .pipeline import Analyzer

RAY_EXTRA = "pip install 'covidct-diagnosis[ray]'"
LOCAL = "local"  # --ray local: start a Ray cluster on this machine for this batch
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20  # only paths and reports travel through it
CPUS_PER_WORKER = 2  # without GPUs: one worker per two CPU cores
MAX_ATTEMPTS = 2  # a case whose worker died is tried once more, on a new actor


def require_ray():
    """The `ray` module; UsageError naming the extra to install when it is missing."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


class CaseWorker:
    """One Ray actor: the model loaded once (an `Analyzer` built from `spec`, `Analyzer.spec`), limited to
    `threads` CPU threads (`cpu_threads`: PyTorch, OpenCV, the reader, lung extraction), analysing one case
    per `analyse` call."""

    def __init__(self, spec: tuple, threads: int, out_dir: Path, dicom_out: Path | None, key: dict, analyze_options: dict):
        self.analyzer = Analyzer(*spec, threads=threads)
        self.out_dir, self.dicom_out, self.key, self.analyze_options = out_dir, dicom_out, key, analyze_options

    def pid(self) -> int:
        return os.getpid()

    def analyse(self, case: Case) -> CaseOutcome:
        return analyse_case(self.analyzer, case, self.out_dir, self.dicom_out, self.key, **self.analyze_options)


def plan_workers(resources: dict, device: str, workers: int | None, threads_per_worker: int | None) -> tuple[int, int, float]:
    """(workers, torch threads per worker, GPUs per worker) for a cluster of `resources` (ray.cluster_resources()).

    Default: one worker per GPU (unless device is "cpu"), else one per CPUS_PER_WORKER CPU cores; each
    with its share of the cluster's CPUs as threads. More workers than GPUs share them. UsageError when
    the workers would need more CPUs than the cluster has (they would wait for ever).
    """
    cpus = int(resources.get("CPU", 1))
    gpus = 0 if device == "cpu" else int(resources.get("GPU", 0))
    count = workers or (gpus if gpus else max(1, cpus // CPUS_PER_WORKER))
    threads = threads_per_worker or max(1, cpus // count)
    if count * threads > cpus:
        raise UsageError(f"{count} Ray workers of {threads} threads need {count * threads} CPUs; the cluster has {cpus}")
    return count, threads, (min(1.0, gpus / count) if gpus else 0.0)


def run_on_ray(
    analyzer: Analyzer,
    cases: list[Case],
    out_dir: Path,
    dicom_out: Path | None,
    key: dict,
    plan: tuple[int, int, float],
    progress: Callable[[str, float], None] | None = None,
    **analyze_options,
) -> Iterator[tuple[int, CaseOutcome]]:
    """Analyse `cases` into out_dir/<case_id>/ (and dicom_out/<case_id>/) on Ray with `batch.analyse_case`; yields
    (index in `cases`, outcome) as each finishes, each case once.

    Runs inside `cluster(...)`, with the workers it planned (`plan_workers`); they build the analyzer from
    `analyzer.spec` and are stopped at the end. `progress(stage, fraction)` after each case: "<d> done,
    <f> failed, <r> running of <n> cases; about <t> left".
    """
    ray = require_ray()
    if not cases:
        return
    count, threads, gpus = plan
    actors = []
    try:
        actor_class = ray.remote(CaseWorker).options(num_cpus=threads, num_gpus=gpus)

        def new_actor():
            actors.append(actor_class.remote(analyzer.spec, threads, out_dir, dicom_out, key, analyze_options))
            return actors[-1]

        queue, attempts, running = deque(range(len(cases))), [0] * len(cases), {}

        def submit(actor) -> None:
            i = queue.popleft()
            attempts[i] += 1
            running[actor.analyse.remote(cases[i])] = (actor, i)

        for _ in range(min(count, len(cases))):
            submit(new_actor())
        tally = _Tally(len(cases), progress)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, i = running.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the worker process died (killed, out of memory, node lost)
                ray.kill(actor)
                actor = None
                outcome = None if attempts[i] < MAX_ATTEMPTS else _given_up(cases[i], out_dir, dicom_out, exc)
                if outcome is None:
                    queue.appendleft(i)
            if queue:
                submit(actor or new_actor())
            if outcome is not None:
                tally.add(outcome.status, len(running))
                yield i, outcome
    finally:
        for actor in actors:
            ray.kill(actor)


@contextmanager
def cluster(address: str, analyzer: Analyzer, workers: int | None = None, threads_per_worker: int | None = None):
    """This process connected to the Ray cluster at `address` while in the block, which gets the workers' plan
    (`plan_workers`, for `run_on_ray`): "local" starts a cluster on this machine (all its CPUs and GPUs, a small
    object store, no dashboard), "auto" or "ray://host:port" connects to a running one; a cluster started or
    connected here is shut down or left at the end. An existing connection (ray.is_initialized()) is used and
    left open. UsageError when Ray is missing, the cluster cannot be reached or is too small for the workers;
    ValueError for an analyzer built from a network in memory (the workers build theirs from `analyzer.spec`)."""
    ray = require_ray()
    if analyzer.spec is None:
        raise ValueError("a batch on Ray needs an Analyzer built from a model file (Analyzer(model, device)), "
                         "not one built from a network in memory")
    started = _connect(ray, address)
    try:
        yield plan_workers(ray.cluster_resources(), analyzer.spec[1], workers, threads_per_worker)
    finally:
        if started:
            ray.shutdown()


def _connect(ray, address: str) -> bool:
    """Connect to (or, for "local", start) the cluster; True when this call did (and must shut it down)."""
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address == LOCAL:
            ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())
        raise UsageError(f"--ray {address}: cannot connect to a Ray cluster: {detail}") from exc
    return True


def _given_up(case: Case, out_dir: Path, dicom_out: Path | None, exc: Exception) -> CaseOutcome:
    """A case whose worker died MAX_ATTEMPTS times: failed, and what its killed writers left half-written
    (hidden staging folders of its result and DICOM folders) removed, as a retry would have."""
    discard_case_leftovers(case, out_dir, dicom_out)
    return CaseOutcome(case, "failed", error=_died(exc))


def _died(exc: Exception) -> str:
    reason = " ".join(str(exc).split()[:40]) or type(exc).__name__
    return f"the Ray worker analysing it died {MAX_ATTEMPTS} times (killed, out of memory or crashed): {reason}"


class _Tally:
    """Cases done / failed / running and the time left (from the pace so far), to `progress`."""

    def __init__(self, total: int, progress: Callable[[str, float], None] | None):
        self.total, self.progress, self.start = total, progress, time.monotonic()
        self.counts = {"done": 0, "failed": 0}

    def add(self, status: str, running: int) -> None:
        self.counts[status] += 1
        if self.progress is None:
            return
        finished = sum(self.counts.values())
        left = (time.monotonic() - self.start) / finished * (self.total - finished)
        self.progress(f"{self.counts['done']} done, {self.counts['failed']} failed, {running} running of {self.total} "
                      f"cases; about {_duration(left)} left", finished / self.total)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
