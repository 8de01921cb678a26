"""The model room: the transformer (``transformer``, imports only torch), the named ladder of sizes
(``ladder``) and the seed study's reference implementation (``reference``); the fused attention
kernel is ``cellscale.kernels``. ``from cellscale.model import CellTransformer`` reads the
transformer's names from here.
"""

from cellscale.model.transformer import *  # noqa: F403
from cellscale.model.transformer import __all__  # noqa: F401
