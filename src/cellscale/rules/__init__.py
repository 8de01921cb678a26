"""The rules of the science, shared by training, the sweep, the fit and the report: when a run has
converged (``plateau``), which learning rate and which loss column (``lrgrid``), the schedules
(``schedule``), the objectives and their least losses (``objectives``, ``lossbounds``), and the
Gaussian entropy (``bits``). All torch-free but ``objectives``; nothing here imports the rooms above.
"""
