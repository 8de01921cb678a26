"""Does a lower loss buy better biology? A run's cell embedding (``embedding``: the notebook API
``embed(adata, run)`` and the CLI's ``embed_run``) and its downstream scores (``scores``: probes, kNN
label transfer, batch mixing). ``from cellscale.downstream import probe_cells`` reads ``scores``.
"""

from cellscale.downstream.scores import *  # noqa: F403
from cellscale.downstream.scores import __all__  # noqa: F401
