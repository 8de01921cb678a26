import numpy as np
import pytest

from cellscale.errors import FitError
from cellscale.fit import entropy_bits, entropy_bits_per_gene
from cellscale.fit.entropy import entropy_summary


def test_study_entropy():
    assert entropy_bits(1.444) == pytest.approx(2.31, abs=0.005)
    assert entropy_bits(1.0) == pytest.approx(0.5 * np.log2(2 * np.pi * np.e))


def test_entropy_vectorised_and_zero():
    h = entropy_bits(np.array([0.5, 1.0, 2.0]))
    assert np.allclose(np.diff(h), 0.5)  # doubling the variance adds half a bit
    assert entropy_bits(0.0) == -np.inf


@pytest.mark.parametrize("seed", range(5))
def test_per_gene_never_above_homoscedastic(seed):
    mse = np.random.default_rng(seed).lognormal(0.0, 1.0, size=500)
    per_gene = entropy_bits_per_gene(mse)
    assert per_gene < entropy_bits(mse.mean())
    # Jensen's gap for log-normal variances is known: 0.5 log2(e) * (mean log - log mean).
    gap = 0.5 * (np.mean(np.log(mse)) - np.log(mse.mean())) / np.log(2)
    assert per_gene - entropy_bits(mse.mean()) == pytest.approx(gap)


def test_per_gene_equal_errors_equal_figures():
    assert entropy_bits_per_gene(np.full(10, 1.3)) == pytest.approx(entropy_bits(1.3))


def test_summary_per_gene_block():
    mse = np.array([0.5, 1.0, 4.0])
    out = entropy_summary(1.4, (1.3, 1.5), mse)
    assert out["gaussian"] == pytest.approx(entropy_bits(1.4))
    block = out["per_gene"]
    assert block["bits"] <= block["homoscedastic_same_errors"]
    assert block["at_floor"] <= out["gaussian"]
    assert "homoscedastic" in out["label"]


def test_per_gene_rejects_bad_values():
    with pytest.raises(FitError, match="per-gene MSEs"):
        entropy_bits_per_gene([1.0, -1.0])
