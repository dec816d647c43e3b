"""The statistics bench/chat_quality.py prints beside its counts: whether a 4-bit model's net loss of
answers against bf16 is more than the churn between them (an exact sign test), and the sampled
answers' difference seed by seed."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from chat_quality import paired_difference, sign_test_p  # noqa: E402


@pytest.mark.parametrize("lost,gained", [(1, 0), (3, 3), (5, 0), (10, 6), (13, 6), (20, 7), (2, 40)])
def test_sign_test_is_scipys_exact_binomial_test(lost, gained):
    from scipy.stats import binomtest

    want = binomtest(lost, lost + gained, 0.5, alternative="two-sided").pvalue
    assert sign_test_p(lost, gained) == pytest.approx(want, rel=1e-12)
    assert sign_test_p(gained, lost) == sign_test_p(lost, gained)


def test_sign_test_edges():
    assert sign_test_p(0, 0) == 1.0  # no question answered differently
    assert sign_test_p(4, 4) == 1.0  # no net change: nothing to explain
    assert sign_test_p(5, 0) == 2 / 32  # all five one way: 1/32 each way round
    assert [sign_test_p(k, 12 - k) for k in range(7)] == sorted(sign_test_p(k, 12 - k) for k in range(7))


@pytest.mark.parametrize("n", [2, 3, 10])
def test_paired_difference_is_the_mean_and_standard_error_of_the_differences(n):
    ref = [50 + 3 * i for i in range(n)]
    got = [r - 4 + (i % 2) for i, r in enumerate(ref)]
    diffs = [g - r for g, r in zip(got, ref)]
    mean, se = paired_difference(got, ref)
    assert mean == pytest.approx(sum(diffs) / n)
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    assert se == pytest.approx(math.sqrt(var / n))
    # a luck both models share moves neither figure
    assert paired_difference([g + 7 * i for i, g in enumerate(got)], [r + 7 * i for i, r in enumerate(ref)]) == (mean, se)


def test_paired_difference_needs_the_same_seeds():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([], [])
