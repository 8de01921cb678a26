"""User-facing errors: the CLI prints ``error: <message>`` for these and exits non-zero."""


class CellscaleError(Exception):
    """Base class of errors caused by input or settings, never by a bug."""


class DataError(CellscaleError):
    """A data file or dataset directory that cannot be used as it is."""


class FitError(CellscaleError):
    """A results table that cannot be fitted (too few points, NaN, constant columns...)."""


class RunError(CellscaleError):
    """A training or sweep directory in a state that refuses the requested action."""
