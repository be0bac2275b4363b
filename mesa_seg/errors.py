"""The errors mesa-seg raises for bad input or a failed run.

Kept apart from the code that raises them (as torch's ``_dynamo/exc.py``), so
any layer can raise or catch them without importing another layer. The tools
print each as one line: :class:`UsageError` and its subclasses exit with 2
(nothing was trained or written), :class:`NonFiniteLossError` with 1.
"""

__all__ = [
    'UsageError', 'DataError', 'CheckpointMismatchError', 'LabelError',
    'NonFiniteLossError'
]


class UsageError(Exception):
    """Bad user input; the tools print it as one line and exit with 2."""


class DataError(UsageError):
    """A dataset that cannot be trained or evaluated on as it is."""


class CheckpointMismatchError(UsageError):
    """A checkpoint's weights do not fit the model (beyond Mesa's buffers)."""


class LabelError(UsageError):
    """A training label lies outside ``[0, num_classes)`` and is not ignored."""


class NonFiniteLossError(FloatingPointError):
    """The loss is NaN/Inf; raised before backward, so weights are intact."""
