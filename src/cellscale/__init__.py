"""cellscale: scaling laws for masked-reconstruction transformers on single-cell data."""

__version__ = "0.1.0"
