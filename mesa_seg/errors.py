"""The errors mesa-seg raises for bad input or a failed run.

Kept apart from the code that raises them (as torch's ``_dynamo/exc.py``), so
any layer can raise or catch them without importing another layer. The tools
print each as one line and exit with its class's ``exit_code``:

==== ==================================================================
code meaning
==== ==================================================================
1    the run stopped on a fault of its own: a NaN/Inf loss
     (:class:`NonFiniteLossError`), a data file that no longer loads
     (:class:`DataFileError`)
2    bad input, found before anything was trained or written
     (:class:`UsageError` and its subclasses)
3    a rank died or stopped answering (:class:`RankFailureError`)
4    a checkpoint could not be written (:class:`CheckpointSaveError`)
75   preempted: SIGTERM received, checkpoint saved (:class:`Preempted`;
     ``EX_TEMPFAIL`` of ``sysexits.h``: try again, with ``--resume``)
==== ==================================================================

In every case but 2 the newest checkpoint in the work dir is complete and
``--resume`` continues from it.
"""

__all__ = [
    'UsageError', 'DataError', 'CheckpointMismatchError', 'LabelError',
    'NonFiniteLossError', 'DataFileError', 'RankFailureError',
    'CheckpointSaveError', 'Preempted', 'exit_code'
]


class UsageError(Exception):
    """Bad user input; the tools print it as one line and exit with 2."""

    exit_code = 2


class DataError(UsageError):
    """A dataset that cannot be trained or evaluated on as it is."""


class CheckpointMismatchError(UsageError):
    """A checkpoint's weights do not fit the model (beyond Mesa's buffers)."""


class LabelError(UsageError):
    """A training label lies outside ``[0, num_classes)`` and is not ignored."""


class NonFiniteLossError(FloatingPointError):
    """The loss is NaN/Inf; raised before backward, so weights are intact."""

    exit_code = 1


class DataFileError(RuntimeError):
    """A data file failed to load during the run (deleted, truncated or
    overwritten after the start-of-run checks). Raised in the dataset, so
    possibly in a dataloader worker: takes one message argument."""

    exit_code = 1


class RankFailureError(RuntimeError):
    """Another rank died or stopped answering; this rank stopped."""

    exit_code = 3


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, I/O error); the previous
    checkpoint is intact."""

    exit_code = 4


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint; not a failure
    of the run: ``--resume`` continues it exactly."""

    exit_code = 75


def exit_code(error: BaseException) -> int:
    """The tools' exit code for ``error`` (1 unless its class sets one)."""
    return getattr(error, 'exit_code', 1)
