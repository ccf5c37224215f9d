"""The kit's figures do not flatter: no clipped titles, no labels running into a neighbour,
no value silently cut off an axis, MMD^2 drawn where it is (zero and below included), and
captions only where they apply. Each figure is drawn from data made here (fast), and checked
on the matplotlib figure itself, as rendered."""
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

import experiment as ex
import plots
import summarize
from test_summary_stats import _full_runs


@pytest.fixture
def drawn(monkeypatch):
    """Every figure plots.py renders, in order (the figures, before they are closed)."""
    figs = []
    render = plots._render

    def keep(fig, fmt="png"):
        figs.append(fig)
        return render(fig, fmt)

    monkeypatch.setattr(plots, "_render", keep)
    return figs


def _boxes(fig):
    """(text, its bounding box in pixels) of every visible, non-empty text of the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # pyplot let go of the figure when plots.py closed it
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for t in fig.findobj(matplotlib.text.Text):
        if t.get_visible() and t.get_text().strip() and id(t) not in _undrawn_ticks(fig):
            out.append((t, t.get_window_extent(renderer)))
    return out


def _undrawn_ticks(fig):
    """Tick labels matplotlib keeps for ticks outside an axis' view, and does not draw."""
    hidden = set()
    for a in fig.axes:
        for axis in (a.xaxis, a.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            span = hi - lo
            for loc, label in zip(axis.get_majorticklocs(), axis.get_ticklabels()):
                if not lo - 1e-9 * span <= loc <= hi + 1e-9 * span:
                    hidden.add(id(label))
    return hidden


def assert_readable(fig, what):
    """No text cut by the figure's edge, and no axes' tick label inside another axes."""
    W, H = fig.canvas.get_width_height()
    for t, box in _boxes(fig):
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= W + 1 and box.y1 <= H + 1, \
            f"{what}: {t.get_text()!r} is cut by the figure's edge ({box} in {W}x{H})"
    renderer = fig.canvas.get_renderer()
    axes = [a for a in fig.axes if a.get_visible() and a.axison]
    hidden = _undrawn_ticks(fig)
    for a in axes:
        for label in a.get_yticklabels() + a.get_xticklabels():
            if not label.get_text().strip() or id(label) in hidden:
                continue
            box = label.get_window_extent(renderer)
            for other in axes:
                if other is a:
                    continue
                o = other.get_window_extent(renderer)
                overlap = min(box.x1, o.x1) - max(box.x0, o.x0) > 1 and min(box.y1, o.y1) - max(box.y0, o.y0) > 1
                assert not overlap, f"{what}: the label {label.get_text()!r} runs into another panel"


def _run_csv(tmp_path, mmd, test_mmd=(2e-4, 3e-4), flag_at=None, gap=None):
    """A run folder (args.csv and CSV) with these validation MMD^2 values, one row each."""
    n = len(mmd)
    it = np.arange(1, n + 1) * 20
    rows = [dict(iter=int(i), lr=0.01, running_loss=3.0, val_loss=2.9 if gap is None else 2.8319 + gap[k],
                 val_loss_se=0.03, val_loss_lowp=2.9, nll_gap=0.07, val_mmd=m, train_mmd=m / 2, val_loss_fine=2.9,
                 grid_gap=1e-6, grid_exploited=int(flag_at is not None and i >= flag_at), time_fwd=0.01,
                 time_bwd=0.02, time_fwd_sum=0.1, time_bwd_sum=0.2, max_memory_mb=100, loss_scale=1,
                 overflow_steps=0) for k, (i, m) in enumerate(zip(it, mmd))]
    rows[-1].update(test_loss=2.9, test_loss_se=0.006, test_gap=0.07, test_mmd=test_mmd[0], test_mmd_se=test_mmd[1],
                    val_loss_exact=2.9, disc_gap=0.0)
    tmp_path.mkdir(parents=True, exist_ok=True)
    run = ex.RunDir(tmp_path)
    ex.write_csv(run.csv, rows)
    ex.write_args(run, {"data": "8gaussians", "grid_gap_max": 0.01}, {})
    return run


def test_the_mmd_panel_shows_zero_and_negative_values_where_they_are(tmp_path, drawn):
    """The unbiased MMD^2 goes below zero when model and data agree within noise. Its panel
    must draw those values at their place (a symmetric log axis, linear and shaded near 0),
    not clipped to a floor on a log axis where they would look like the best iterations;
    and the test MMD^2 carries its standard error."""
    mmd = [3e-2, 5e-3, 8e-4, -2e-4, 3e-4, -6e-5, 1e-4]
    run = _run_csv(tmp_path, mmd)
    plots.plot_optimization(run.csv, run.file("o.png"), 2.83, "t")
    plots.plot_mmd(run.csv, run.file("m.png"))
    for fig in drawn:
        ax = next(a for a in fig.axes if a.get_title().startswith("MMD"))
        assert ax.get_yscale() in ("symlog", "linear")
        lo, hi = ax.get_ylim()
        assert lo < min(mmd) and hi > max(mmd)
        line = next(ln for ln in ax.get_lines() if "samples vs data" in ln.get_label())
        assert np.allclose(line.get_ydata(), mmd)  # drawn as measured
        assert any("± SE" in c.get_label() for c in ax.containers), "the test MMD^2 without its standard error"
        assert_readable(fig, "optimization_stats.png" if fig is drawn[0] else "mmd_plot.png")


def test_flow_frames_keep_their_titles_inside(drawn):
    """Each frame's three titles are inside the image (they were cut at the top)."""
    rng = np.random.default_rng(0)
    g = 10
    side = np.linspace(-4.5, 4.5, g)
    grid = np.stack(np.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2)
    snaps = {"times": np.array([0.0, 0.5, 1.0]), "samples": rng.normal(size=(3, 300, 2)),
             "density_xy": np.stack([grid] * 3).astype(np.float32),
             "density_logp": np.stack([-0.5 * (grid ** 2).sum(1)] * 3).astype(np.float32)}
    files = plots.flow_frames(rng.normal(size=(300, 2)), snaps)
    assert sorted(files) == ["cnf-viz-000.jpg", "cnf-viz-001.jpg", "cnf-viz-002.jpg", "cnf-viz.gif"]
    (fig,) = {id(f): f for f in drawn}.values()
    assert [a.get_title() for a in fig.axes] == ["target", "samples, t = 1.00", "model density, t = 1.00"]
    assert_readable(fig, "cnf-viz frames")


def test_compare_says_when_it_cuts_an_axis_and_captions_only_what_happened(tmp_path, drawn):
    """The NLL-gap panel keeps the last hundredths readable by cutting its axis: when a run's
    values lie beyond it, the panel says so and marks them at the edge; when none does, it says
    nothing. The caption about grid_exploited appears only when a run raised the flag."""
    a = _run_csv(tmp_path / "a", [1e-3] * 6, gap=[1.2, 0.4, 0.1, 0.05, 0.04, 0.03])
    b = _run_csv(tmp_path / "b", [1e-3] * 6, gap=[0.3, 0.2, 0.1, 0.05, 0.04, 0.02])
    plots.plot_runs([a.path, b.path], str(tmp_path / "c1.png"), labels=["a", "b"])
    fig = drawn[-1]
    gap_ax = fig.axes[0]
    assert "axis cut" in gap_ax.get_title() and gap_ax.get_ylim()[1] < 1.2
    assert any(ln.get_marker() == "^" for ln in gap_ax.get_lines())  # the cut values, on the edge
    assert "grid_exploited" not in fig._suptitle.get_text()
    assert_readable(fig, "compare")
    plots.plot_runs([b.path, b.path], str(tmp_path / "c2.png"), labels=["b", "b again"])
    assert "axis cut" not in drawn[-1].axes[0].get_title()
    flagged = _run_csv(tmp_path / "f", [1e-3] * 6, flag_at=80, gap=[0.3, 0.2, 0.1, 0.05, 0.04, 0.02])
    plots.plot_runs([flagged.path, b.path], str(tmp_path / "c3.png"), labels=["f", "b"])
    assert "grid_exploited flag rose" in drawn[-1]._suptitle.get_text()


def test_the_summary_figure_keeps_its_labels_apart(tmp_path, drawn):
    """summary.png: the long cell labels of the middle and right columns do not run into the
    neighbouring panels, nothing is cut by the figure's edge."""
    runs = _full_runs([(0, "completed", math.nan, True), (1, "completed", math.nan, True)])
    ref = runs.assign(precision="float32", scaler="none", run=[r + "-ref" for r in runs["run"]])
    runs = pd.concat([runs, ref], ignore_index=True)
    cells = summarize.cell_table(runs)
    curves = {r: pd.DataFrame({"iter": [50, 100], "val_loss": [3.7, 3.6]}) for r in runs["run"]}
    plots.plot_summary(cells, runs, curves, str(tmp_path / "summary.png"))
    assert_readable(drawn[-1], "summary.png")

def test_answer_ratios_are_to_the_float32_cell_of_the_same_solver():
    """answer.png's time and memory ratios: each cell over its own solver's float32 cell;
    a cell without numbers (diverged) and a solver without float32 give NaN, not a bar."""
    g = pd.DataFrame(dict(solver=["a", "a", "b", "b", "a", "c"], reference=[True, False, True, False, False, False],
                          ms_fwd_mean=[10.0, 30.0, 4.0, 6.0, math.nan, 5.0], ms_bwd_mean=[10.0, 10.0, 4.0, 2.0, math.nan, 5.0]))
    r = plots.ratio_to_float32(g, ("ms_fwd_mean", "ms_bwd_mean"))
    assert r[:4].tolist() == [1.0, 2.0, 1.0, 1.0] and math.isnan(r[4]) and math.isnan(r[5])


def test_answer_draws_the_per_point_series_only_where_it_has_values(tmp_path, drawn):
    """answer.png: without the runs' per-point log-likelihoods (a published folder keeps only the
    CSVs) the left panel has the seeds' intervals alone, and no legend entry for points it lacks."""
    runs = _full_runs([(0, "completed", math.nan, True), (1, "completed", math.nan, True), (2, "completed", math.nan, True)])
    ref = runs.assign(precision="float32", scaler="none", run=[r + "-ref" for r in runs["run"]])
    cells = summarize.cell_table(pd.concat([runs, ref], ignore_index=True))
    legend = lambda: [t.get_text() for t in drawn[-1].axes[0].get_legend().get_texts()]  # noqa: E731
    plots.plot_answer(cells.assign(point_diff_mean=math.nan, point_diff_se=math.nan), str(tmp_path / "a.png"))
    assert not any("per point" in t for t in legend()) and any("interval" in t for t in legend()), legend()
    paired = cells["diff_mean"].notna()
    plots.plot_answer(cells.assign(point_diff_mean=cells["diff_mean"].where(paired), point_diff_se=0.001),
                      str(tmp_path / "b.png"))
    assert any("per point" in t for t in legend()), legend()
    # no cell with a float32 twin: the panel says so, and no empty legend is drawn
    plots.plot_answer(cells.assign(diff_mean=math.nan, diff_ci_low=math.nan, diff_ci_high=math.nan,
                                   point_diff_mean=math.nan), str(tmp_path / "c.png"))
    left = drawn[-1].axes[0]
    assert left.get_legend() is None and any("no paired difference" in t.get_text() for t in left.texts)
