"""tools/bench_width.py's routing model, which the projection of docs/speculative.md ("At V4-Flash's width") scales
the small model's routing with: without stickiness its unions are independent tokens' (the closed form), and with
full stickiness a token repeats the one before's experts."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_width  # noqa: E402


@pytest.mark.parametrize("n_exp,k,m", [(256, 6, 2), (256, 6, 9), (8, 2, 5)])
def test_random_routing_unions_are_the_closed_form(n_exp, k, m):
    runs = bench_width.sticky_routing(n_exp, k, 0.0, m, 4000, np.random.default_rng(1))
    assert all(sum(q) == k * m and max(q) <= m for q in runs)  # k distinct picks a token
    expected = n_exp * (1 - (1 - k / n_exp) ** m)
    assert np.mean([len(q) for q in runs]) == pytest.approx(expected, rel=0.01)


def test_full_stickiness_repeats_the_token_before():
    runs = bench_width.sticky_routing(256, 6, 1.0, 9, 50, np.random.default_rng(2))
    assert all(sorted(q) == [9] * 6 for q in runs)


def test_stickiness_shrinks_the_union():
    rng = np.random.default_rng(3)
    unions = [np.mean([len(q) for q in bench_width.sticky_routing(256, 6, st, 5, 1000, rng)])
              for st in (0.0, 0.3, 0.6)]
    assert unions[0] > unions[1] + 2 > unions[2] + 4
