"""summarize.py's statistics against numbers worked out by hand: the mean and sample sd over
seeds, the Student-t interval of paired differences, the point-by-point standard error, and
which of several runs of one seed enters them. Fast: no sweep runs here (test_sweeps.py runs
the whole pipeline)."""
import math
import uuid

import numpy as np
import pandas as pd
import pytest

import experiment as ex
import plots
import summarize
import tables


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


def _full_runs(rows):
    """A runs table with every column cell_table reads; ``rows``: (seed, status, grid flag
    iteration or NaN, used)."""
    cell = dict(data="checkerboard", solver="torchmpnode", precision="float16", scaler="dynamic")
    out = []
    for seed, status, flag, used in rows:
        out.append(dict(cell, seed=seed, status=status, iter=100, test_nll=3.5 + 0.01 * seed, test_nll_se=0.01,
                        test_gap=0.03, val_nll=3.6, val_nll_se=0.03, nll_gap=0.1, val_nll_exact=3.6, disc_gap=0.0,
                        val_mmd=1e-3, test_mmd=1e-4, test_mmd_se=1e-4, ms_fwd=1.0, ms_bwd=2.0, ms_iter=3.0,
                        peak_mb=10.0, overflow_steps=0, grid_exploited=flag, run=f"/nowhere/{uuid.uuid4()}",
                        used=used))
    return pd.DataFrame(out)


def test_the_grid_mark_counts_only_the_seeds_in_the_statistics():
    """‡ (and the cell's grid_exploited count) says that a number in the cell comes from a model
    that games its grid. A run that is not in the cell's statistics (stopped by
    --on_grid_exploit stop, or an ignored duplicate of a seed) cannot put it there; a completed
    seed in the statistics does."""
    import tables

    nan = math.nan
    clean = _full_runs([(0, "completed", nan, True), (1, "completed", nan, True),
                        (2, "grid_exploited", 5250, True),  # stopped at the flag: status grid_exploited
                        (0, "completed", 4000, False)])  # a duplicate of seed 0, ignored
    cells = summarize.cell_table(clean)
    assert cells["n"].tolist() == [2] and cells["grid_exploited"].tolist() == [0]
    assert tables.FLAG_MARK not in tables.to_latex(cells) and "‡" not in summarize.overview_marks(cells.iloc[0])
    flagged = _full_runs([(0, "completed", nan, True), (1, "completed", 3000, True)])
    cells = summarize.cell_table(flagged)
    assert cells["grid_exploited"].tolist() == [1]
    assert tables.FLAG_MARK in tables.to_latex(cells) and "‡" in summarize.overview_marks(cells.iloc[0])
    assert "grid\\_exploited" in tables.tex_caption(cells)


def _cell_runs(seeds, data="moons"):
    """A runs table for summarize.cell_table: float32 and float16 cells of one solver, one run per seed."""
    rows = []
    for precision, scaler, shift in (("float32", "none", 0.0), ("float16", "dynamic", 0.01)):
        for seed in seeds:
            rows.append(dict(data=data, solver="torchmpnode", precision=precision, scaler=scaler, seed=seed,
                             status="completed", iter=100, test_nll=2.5 + shift + 0.003 * seed, test_nll_se=0.01,
                             test_gap=0.1, val_nll=2.6, val_nll_se=0.03, nll_gap=0.2, val_nll_exact=2.6, disc_gap=0.0,
                             val_mmd=1e-3, test_mmd=1e-4, test_mmd_se=1e-4, ms_fwd=10.0, ms_bwd=20.0, ms_iter=30.0,
                             peak_mb=100.0, overflow_steps=0, grid_exploited=float("nan"),
                             run=f"/nowhere/{uuid.uuid4()}", used=True))
    return pd.DataFrame(rows)


def test_intervals_over_fewer_than_three_seeds_are_marked_indicative(tmp_path):
    """Two seed pairs give an interval with a t quantile of 12.7: the tables and the figure mark it
    indicative, and only then; three pairs are not marked."""
    for seeds, marked in (((0, 1), True), ((0, 1, 2), False)):
        runs = _cell_runs(seeds)
        cells = summarize.cell_table(runs)
        row = cells[cells["precision"] == "float16"].iloc[0]
        assert row["pairs"] == len(seeds) and bool(row["indicative"]) == marked
        md = tables.to_markdown(cells, runs)
        tex = tables.to_latex(cells)
        (row_line,) = [ln for ln in tex.splitlines() if ln.startswith("float16 &")]  # the float16 cell's row
        assert ("*indicative*" in md) == marked and (tables.INDICATIVE_MARK in row_line) == marked
        assert ("indicative only" in tables.tex_caption(cells)) == marked
        labels = plots.paired_labels(cells[cells["data"] == "moons"].reset_index(drop=True))
        assert any("indicative" in label for label in labels) == marked
        out = tmp_path / f"summary_{len(seeds)}.png"
        plots.plot_summary(cells, runs, {r: pd.DataFrame({"iter": [50, 100], "val_loss": [2.7, 2.6]})
                                         for r in runs["run"]}, str(out))
        assert out.stat().st_size > 10000
    one = summarize.cell_table(_cell_runs((0,)))
    assert not one["indicative"].any()  # one seed: no interval at all, nothing to mark
    # the figure's label says so, rather than letting the bare point pass for a tight interval
    assert "torchmpnode float16 dynamic (1 pair; no interval)" in \
        plots.paired_labels(one[one["data"] == "moons"].reset_index(drop=True))

