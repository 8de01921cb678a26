"""The runtime under every room: atomic files and checksums (``io``), checkpoints (``checkpoint``), the
usable CPUs (``cpus``), signals (``preempt``), progress bars (``progress``), data parallelism
(``distributed``) and TensorBoard events (``tblog``). No science here.
"""
