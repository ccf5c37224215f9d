"""summarize.py's statistics against numbers worked out by hand: the mean and sample sd over
seeds, the Student-t interval of paired differences, the point-by-point standard error, and
which of several runs of one seed enters them. Fast: no sweep runs here (test_sweeps.py runs
the whole pipeline)."""
import math

import numpy as np
import pandas as pd
import pytest

import experiment as ex
import summarize


def test_mean_and_sample_sd_of_the_finite_values():
    mean, sd, n = summarize.mean_sd([1.0, 2.0, 3.0, math.nan, math.inf, 6.0])
    # (1 + 2 + 3 + 6) / 4 = 3; squared deviations 4 + 1 + 0 + 9 = 14 over n - 1 = 3
    assert (mean, n) == (3.0, 4) and sd == pytest.approx(math.sqrt(14 / 3), rel=1e-12)
    one = summarize.mean_sd([5.0])
    assert one[0] == 5.0 and math.isnan(one[1]) and one[2] == 1
    assert summarize.mean_sd([math.nan])[2] == 0


def test_paired_t_interval_uses_the_student_t_quantile_with_n_minus_1_degrees():
    # t_{0.975, 3} = 3.182446305284263 (any t table); sd = sqrt(14/3) as above, n = 4
    mean, sd, lo, hi = summarize.t_interval([1.0, 2.0, 3.0, 6.0])
    half = 3.182446305284263 * math.sqrt(14 / 3) / 2
    assert mean == 3.0 and (lo, hi) == pytest.approx((3.0 - half, 3.0 + half), rel=1e-12), (lo, hi)
    # a 90 % interval: t_{0.95, 3} = 2.353363434801823
    _, _, lo, _ = summarize.t_interval([1.0, 2.0, 3.0, 6.0], confidence=0.90)
    assert lo == pytest.approx(3.0 - 2.353363434801823 * math.sqrt(14 / 3) / 2, rel=1e-12)
    single = summarize.t_interval([2.0])
    assert single[0] == 2.0 and math.isnan(single[2]) and math.isnan(single[3])  # no interval from one pair


def _run_with_logp(folder, logp):
    folder.mkdir()
    np.save(ex.RunDir(folder).test_logp, np.asarray(logp, dtype=np.float32))
    return str(folder)


def test_pointwise_difference_mean_and_standard_error(tmp_path):
    """Seed 0: per-point NLL differences (cell - twin) [1, 3]: mean 2, se sqrt(2)/sqrt(2) = 1.
    Seed 1: [0, 0, 6]: mean 2, se sqrt(12)/sqrt(3) = 2. Independent test sets: the mean of
    the means is 2, and its se is sqrt(1^2 + 2^2) / 2."""
    pairs = [
        (_run_with_logp(tmp_path / "cell0", [-1.0, -3.0]), _run_with_logp(tmp_path / "twin0", [0.0, 0.0])),
        (_run_with_logp(tmp_path / "cell1", [0.0, 1.0, -4.0]), _run_with_logp(tmp_path / "twin1", [0.0, 1.0, 2.0])),
    ]
    mean, se, seeds = summarize.pointwise_difference(pairs)
    assert seeds == 2 and mean == pytest.approx(2.0, rel=1e-12)
    assert se == pytest.approx(math.sqrt(5) / 2, rel=1e-6), se
    # a pair without both files, or with test sets of different sizes, is left out
    pairs.append((_run_with_logp(tmp_path / "cell2", [1.0, 2.0]), str(tmp_path / "nothing")))
    pairs.append((_run_with_logp(tmp_path / "cell3", [1.0, 2.0]), _run_with_logp(tmp_path / "twin3", [1.0, 2.0, 3.0])))
    assert summarize.pointwise_difference(pairs) == pytest.approx((2.0, math.sqrt(5) / 2, 2))


def _runs(*rows):
    """A runs table as main() builds it: one row per (seed, status, stamp, run)."""
    cell = dict(data="moons", solver="torchmpnode", precision="float16", scaler="dynamic")
    return pd.DataFrame([dict(cell, seed=s, status=st, _stamp=t, run=r, used=True) for s, st, t, r in rows])


def test_duplicate_runs_keep_the_newest_completed_one():
    warnings = []
    runs = summarize.mark_duplicates(_runs(
        (0, "completed", "2026-01-01T10:00:00", "old"),
        (0, "completed", "2026-01-02T10:00:00", "new"),
        (0, "diverged", "2026-01-03T10:00:00", "newest_but_diverged"),
        (1, "completed", "2026-01-01T10:00:00", "only"),
        (2, "interrupted", "2026-01-01T10:00:00", "a"),
        (2, "diverged", "2026-01-02T10:00:00", "b"),
    ), warn=warnings.append)
    assert dict(zip(runs["run"], runs["used"])) == {"old": False, "new": True, "newest_but_diverged": False,
                                                    "only": True, "a": False, "b": True}
    assert len(warnings) == 2 and "using new" in warnings[0] and "using b" in warnings[1]
