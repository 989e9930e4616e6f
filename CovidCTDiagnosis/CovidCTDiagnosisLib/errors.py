"""Errors the engine raises for bad input, each with the command-line exit code it maps to.

Every message is one line a user can act on; `covidct` prints it to stderr and exits with
`exit_code`. Anything else escaping the engine is a bug (exit code 1).
"""


class CovidCTError(Exception):
    """Base class: a problem with the user's input, model or output, not a bug."""

    exit_code = 1


class UsageError(CovidCTError):
    """An option's value cannot be used (e.g. a removed aggregation), found after argparse has parsed it."""

    exit_code = 2


class InputNotFoundError(CovidCTError):
    """The input path does not exist."""

    exit_code = 3


class UnreadableInputError(CovidCTError):
    """The input exists but cannot be read as an image (corrupt DICOM, empty folder, unknown format)."""

    exit_code = 3


class NotACTError(CovidCTError):
    """The image is readable but not a usable chest CT volume (MR, 2-D, constant, NaNs, bad spacing, gaps,
    uneven slice spacing, gantry tilt, two images at one position, mixed matrix sizes, too many voxels)."""

    exit_code = 4


class NoLungsError(CovidCTError):
    """No lungs, or too little lung to analyse, were found in the image (a CT volume or a slice image)."""

    exit_code = 5


class ModelFileError(CovidCTError):
    """The model file is missing, unreadable, corrupt or for other classes than asked."""

    exit_code = 6


class DeviceError(CovidCTError):
    """The requested compute device is not available (e.g. --device cuda without a GPU)."""

    exit_code = 8


class OutputError(CovidCTError):
    """The output folder cannot be written (permissions, full disk, exists as a file)."""

    exit_code = 7


class SendError(CovidCTError):
    """A PACS could not be reached, refused the association or the files' kinds, or did not store every file."""

    exit_code = 10


class WorkerKilledError(CovidCTError):
    """A process doing part of the analysis was killed (by the system, out of memory?) or ended without a result:
    exit 1 as an internal error, its one line saying which."""

    exit_code = 1


BATCH_CASES_FAILED = 9  # `covidct batch`: it ran to the end, but some or all cases failed (see summary.csv)
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell's convention)
TERMINATED = 143  # SIGTERM (128 + 15): the command line handles it as Ctrl-C

EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: please report it)",
    UsageError.exit_code: "command-line usage error",
    InputNotFoundError.exit_code: "input not found or unreadable (missing path, corrupt or empty DICOM, unknown format)",
    NotACTError.exit_code: "input is not a usable chest CT (not CT, 2-D, constant, NaNs, bad spacing, missing slices, "
                           "uneven slice spacing, gantry tilt, two images at one position, mixed matrix sizes, too large)",
    NoLungsError.exit_code: "no lungs, or too little lung to analyse, in the image",
    ModelFileError.exit_code: "model file missing, corrupt, or not a compatible DRENet checkpoint",
    OutputError.exit_code: "output folder cannot be written",
    DeviceError.exit_code: "requested device not available (e.g. --device cuda without a CUDA GPU)",
    BATCH_CASES_FAILED: "batch: some or all cases failed (the others were analysed; summary.csv has each case's status and error)",
    SendError.exit_code: "send: the PACS could not be reached in time, refused the association, or did not store every "
                         "file (the message says how many of how many were stored)",
    INTERRUPTED: "interrupted (Ctrl-C); nothing of the interrupted analysis was written (`batch` keeps the cases it "
                 "finished; a re-run goes on from them)",
    TERMINATED: "terminated (SIGTERM), as interrupted",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command line was (`cli.run` installs the handler): unwound as Ctrl-C is, so
    that nothing partial is left, then exit TERMINATED."""


class AnalysisCancelled(CovidCTError):
    """The caller's cancel callback asked to stop; nothing was written."""

    exit_code = INTERRUPTED
