"""The CPU threads an analysis uses: one process-wide limit for PyTorch, OpenCV, the DICOM reader's
parallel runs and the lung extraction's slices (`--threads`, `Analyzer(threads=...)`, each Ray worker's
share), so that analyses side by side (a batch split over processes, Ray workers, Slicer beside the
command) share the cores instead of each starting a thread per core.

PyTorch's, OpenCV's and SimpleITK's own settings are process-wide, so this limit is too. Standard
library only until a limit is set.
"""

from __future__ import annotations

import numbers
import os
import sys

_limit: int | None = None


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity: a cluster job's or a container's share), at least 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_threads() -> int:
    """Threads for this process's parallel work: the limit set by `limit_threads`, else every available CPU."""
    return _limit or available_cpus()


def limit_threads(threads: int) -> None:
    """Use at most `threads` CPU threads for parallel work from now on in this process; more than
    `available_cpus()` gain nothing and are taken as that many. ValueError unless a whole number >= 1.

    Sets OpenCV's, SimpleITK's and PyTorch's intra-op thread counts; PyTorch not imported yet reads the
    limit from OMP_NUM_THREADS when it is (the command line sets the limit before it imports PyTorch,
    beside the read). Work that only overlaps other work is not counted: the command line's child process
    that reads the CT and finds its lungs (`forked`, with this limit) beside its torch import, the report
    drawn beside the volume writers.
    """
    global _limit
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"threads must be a whole number of at least 1, not {threads!r}")
    _limit = min(int(threads), available_cpus())
    import cv2
    import SimpleITK as sitk

    cv2.setNumThreads(_limit)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(_limit)
    torch = sys.modules.get("torch")
    if hasattr(torch, "set_num_threads"):
        torch.set_num_threads(_limit)
    else:  # not imported (or still being imported): its thread pool starts with this many threads
        os.environ["OMP_NUM_THREADS"] = str(_limit)
