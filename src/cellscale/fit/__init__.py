"""Scaling-law fitting: laws, methods, grouped bootstrap, entropy, compute-optimal answers.

Imports numpy, scipy and pandas only, so it runs on any machine that has a results table.
"""

from cellscale.fit.core import fit_csv, fit_table
from cellscale.fit.data_axis import DataAxisFit, fit_data_axis, predict_json
from cellscale.fit.entropy import entropy_bits, entropy_bits_per_gene
from cellscale.fit.laws import LAWS
from cellscale.fit.methods import METHODS
from cellscale.fit.result import FitResult
from cellscale.fit.simulate import simulate_branches, simulate_table

__all__ = ["fit_table", "fit_csv", "FitResult", "LAWS", "METHODS", "entropy_bits", "entropy_bits_per_gene",
           "simulate_table", "simulate_branches", "fit_data_axis", "predict_json", "DataAxisFit"]
