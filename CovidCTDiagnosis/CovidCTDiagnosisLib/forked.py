"""Work that needs no torch, run in a forked child process while this process imports torch.

SimpleITK holds the GIL while it reads (its DICOM header scan, decoding and copying), so a CT read
in a thread beside the torch import waits for that import's Python work: P001 (148-slice
JPEG-lossless DICOM) reads in 1.9 s alone and in 3.5-3.7 s beside the import on this project's
2-core machine. A child forked before torch is imported works on its own core instead (the command
line reads the CT and finds its lungs there, `preparation.find_ct_lungs`) and sends the result back
pickled: its large buffers (pickle protocol 5's out-of-band buffers: numpy arrays, SimpleITK images)
through an anonymous shared-memory file, the rest through a pipe (P001's CT and lungs, 116 MB, in
0.31-0.35 s instead of 0.41-0.51 s all through the pipe). The same function runs, so the result is
the same.

The child is forked only where `os.fork` is safe for this (Linux) and before torch is imported;
elsewhere `result()` calls the function in this process.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import traceback
from typing import Callable

from .errors import CovidCTError, WorkerKilledError

FORK_PLATFORMS = ("linux",)  # macOS' system frameworks are not fork-safe; Windows has no fork
PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal this process gets when its parent dies


class ForkedCall:
    """`function(*args, **kwargs)` run in a forked child process from construction on.

    `result()` waits for the return value (pickled back), or raises the `CovidCTError` the function
    raised (same class and message, so the same exit code); any other exception raises RuntimeError, a
    child that died without a result (killed: out of memory?) WorkerKilledError. `close()` (also on
    leaving a `with` block) stops a child still working; a child whose parent dies is killed too.
    Construct it before torch is imported (forking a process that runs torch's threads is not safe);
    after that, or off Linux, `result()` calls the function here instead.
    """

    def __init__(self, function: Callable, *args, **kwargs):
        self.call = (function, args, kwargs)
        self.pid = self._status = None
        if sys.platform.startswith(FORK_PLATFORMS) and "torch" not in sys.modules:
            for stream in (sys.stdout, sys.stderr):  # what is buffered now would be written twice
                if stream is not None:  # None: a stream closed at start (`>&-`)
                    stream.flush()
            parent = os.getpid()
            read_end, write_end = os.pipe()
            self._buffers = os.memfd_create("covidct-forked-call", os.MFD_CLOEXEC)
            self.pid = os.fork()
            if self.pid == 0:
                os.close(read_end)
                _child(parent, write_end, self._buffers, function, args, kwargs)
            os.close(write_end)
            self._pipe = os.fdopen(read_end, "rb")

    def result(self):
        """The function's return value; raises what it raised (see the class)."""
        function, args, kwargs = self.call
        if self.pid is None:
            return function(*args, **kwargs)
        try:
            outcome = pickle.load(self._pipe)
            if isinstance(outcome, tuple):  # (the pickle, its out-of-band buffers' sizes)
                head, sizes = outcome
                outcome = pickle.loads(head, buffers=_read_buffers(self._buffers, sizes))
        except EOFError:
            outcome = None
        finally:
            self.close()
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is None:
            ended = (f"was killed (signal {os.WTERMSIG(self._status)}; out of memory?)" if os.WIFSIGNALED(self._status)
                     else f"ended without a result (exit status {os.WEXITSTATUS(self._status)})")
            raise WorkerKilledError(f"the process running {function.__name__} {ended}")
        return outcome[0]

    def close(self) -> None:
        """Stop the child if it still runs and reap it (idempotent)."""
        if self.pid is None or self._status is not None:
            return
        self._pipe.close()
        os.close(self._buffers)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._status = os.waitpid(self.pid, 0)[1]

    def __enter__(self) -> "ForkedCall":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_buffers(fd: int, sizes: list[int]) -> list[bytearray]:
    """Buffers of `sizes` bytes read one after the other from the start of `fd` (a read returns at most about
    2 GB); EOFError if it ends before."""
    buffers, offset = [bytearray(size) for size in sizes], 0
    for buffer in buffers:
        view = memoryview(buffer)
        while view:
            count = os.preadv(fd, [view], offset)
            if not count:
                raise EOFError
            view, offset = view[count:], offset + count
    return buffers


def _child(parent: int, write_end: int, buffers_fd: int, function: Callable, args: tuple, kwargs: dict) -> None:
    """The child's whole life: call; send the value (`(value,)` pickled, its large buffers written to
    `buffers_fd` one after the other) or the error; exit without Python's teardown."""
    status = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent answers it
        _die_with_parent(parent)
        try:
            value, buffers = function(*args, **kwargs), []  # the value lives on: its buffers are views of it
            outcome = (pickle.dumps((value,), protocol=5, buffer_callback=buffers.append), [b.raw().nbytes for b in buffers])
            with open(buffers_fd, "wb", closefd=False) as out:
                for buffer in buffers:
                    out.write(buffer.raw())
        except CovidCTError as error:
            outcome = error
        except Exception as error:  # a bug: its traceback is printed here, where it happened
            traceback.print_exc()
            outcome = RuntimeError(f"{function.__name__} failed: {type(error).__name__}: {error}")
        with os.fdopen(write_end, "wb") as pipe:
            pickle.dump(outcome, pipe, protocol=pickle.HIGHEST_PROTOCOL)
    except BrokenPipeError:  # the parent stopped waiting
        status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        try:
            if sys.stderr is not None:  # None: started with stderr closed (`2>&-`)
                sys.stderr.flush()
        finally:
            os._exit(status)  # never back into the parent's code


def _die_with_parent(parent: int) -> None:
    """Linux's PR_SET_PDEATHSIG: this process is killed when its parent dies (killed, `kill -9`), instead of
    working on for nobody; if the parent is already gone, end now."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no prctl: the pipe breaks when the child writes its result
        pass
    if os.getppid() != parent:
        os._exit(1)
