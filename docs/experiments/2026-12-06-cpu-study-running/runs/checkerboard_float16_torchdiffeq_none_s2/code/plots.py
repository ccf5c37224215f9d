"""Every figure of the kit, drawn from a run's files or from arrays, never from training
state, so a run can be re-drawn from its folder alone. Each figure is rendered in memory
and written atomically: a figure file that exists is complete.

    python plots.py RUN_DIR [RUN_DIR ...]          # re-draw a run's figures (the flow frames from its checkpoint)
    python plots.py --compare OUT.png RUN_DIR ...  # several runs' validation curves in one figure

- a run: ``optimization_stats.png`` and ``mmd_plot.png`` from its CSV; the flow frames
  ``cnf-viz-NNN.jpg`` and ``cnf-viz.gif`` from the arrays of ``density.flow_arrays``;
- a sweep: ``summary.png`` (``plot_summary``) and ``overview.png/.pdf`` (``plot_overview``),
  from ``summarize.py``'s tables;
- several runs side by side: ``plot_runs`` (``--compare``).
"""
import io
import math
import os
import sys
import textwrap

import experiment as ex

RUN_FIGURES = ("optimization_stats.png", "mmd_plot.png")  # drawn from the CSV
GIF = "cnf-viz.gif"


def frame_name(k):
    """The file name of flow frame ``k``."""
    return f"cnf-viz-{k:03d}.jpg"


def build_parser():
    """plots.py's flags (bad ones: one line, exit code 2)."""
    p = ex.OneLineParser(prog="plots.py", description="Re-draw run folders' figures from their files, "
                         "or compare several runs' validation curves in one figure.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders")
    p.add_argument("--compare", metavar="OUT.png", help="draw one comparison figure of the runs into this file "
                   "(.png, .pdf or .svg) instead")
    p.add_argument("--labels", help="comma-separated legend labels for --compare, one per run "
                   "(default: the settings in which the runs differ)")
    p.add_argument("--title", default="", help="the comparison figure's title")
    p.add_argument("--device", default="cpu", help="where the flow frames are recomputed from a checkpoint")
    return p


COMPARE_USAGE = "usage: plots.py --compare OUT.png RUN_DIR [RUN_DIR ...]: the output file comes first"
FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def check_args(p, args):
    """The checks that need no heavy import; a bad one is one line and exit code 2."""
    if args.compare:
        out = args.compare
        if os.path.isdir(out) or os.path.isfile(os.path.join(out, "args.csv")):
            p.error(f"--compare {out!r} is a folder, not the output file ({COMPARE_USAGE})")
        if os.path.splitext(out)[1].lower() not in FORMATS:
            p.error(f"--compare {out!r}: the output file ends in {', '.join(FORMATS)} ({COMPARE_USAGE})")
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            p.error(f"--compare {out!r}: the folder {parent!r} does not exist")
    for d in args.runs:
        if not os.path.isfile(os.path.join(d, "args.csv")):
            p.error(f"{d!r} is not a run folder (no args.csv)" + (f" ({COMPARE_USAGE})" if args.compare else ""))
    return args


if __name__ == "__main__":
    ex.quiet_exits("plots.py")  # Ctrl-C or a full disk: one line and an exit code, never a traceback
    parser = build_parser()
    check_args(parser, parser.parse_args())  # a bad flag or --help is answered before the heavy imports

import matplotlib  # noqa: E402  (after the flags are checked)

matplotlib.use("Agg")
import imageio.v2 as imageio  # noqa: E402
import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import toy_data  # noqa: E402

MMD_LINEAR = 1e-3  # MMD^2 axes: linear within +-this (the noise level of a 1024-point estimate), log beyond
# Every figure is made at the dpi it is saved at (``_render`` takes the figure's own): matplotlib
# caches text layouts and parsed mathtext per dpi, so the layout pass (tight or constrained) then
# serves the render; at another dpi every label is laid out twice (a run's two CSV figures: 2.0-2.5 s
# -> 1.8-1.9 s under load, docs/testing.md).
RUN_DPI, FRAME_DPI, SWEEP_DPI = 110, 70, 90  # a run's figures, its flow frames, a sweep's summary and answer


def _render(fig, fmt="png"):
    """``fig`` as a file in memory, at the dpi it was made with."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi="figure")
    return buf.getvalue()


def _save(fig, path):
    """Render ``fig`` in the format of ``path``'s extension (PNG by default), close it, and
    write the file atomically."""
    fmt = FORMATS.get(os.path.splitext(path)[1].lower(), "png")
    data = _render(fig, fmt)
    plt.close(fig)
    ex.atomic_write(path, data)


# --- a run's figures ------------------------------------------------------------------------
def plot_optimization(csv_path, out_png, entropy=None, title=""):
    """Loss (with the true entropy as the floor), MMD, learning rate and timing."""
    df = pd.read_csv(csv_path)
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5), dpi=RUN_DPI)
    a = ax[0, 0]
    a.plot(df["iter"], df["running_loss"], label="running loss (train)")
    a.plot(df["iter"], df["val_loss"], "o-", ms=3, label="val NLL (float32)")
    a.plot(df["iter"], df["val_loss_lowp"], "x--", ms=3, label="val NLL (training precision)")
    if "val_loss_fine" in df and df["val_loss_fine"].notna().any():  # the grid watch (older CSVs lack it)
        a.plot(df["iter"], df["val_loss_fine"], "+:", ms=4, label="val NLL, 4x the grid's steps")
    if "grid_exploited" in df and (df["grid_exploited"] == 1).any():
        first = df.loc[df["grid_exploited"] == 1, "iter"].iloc[0]
        a.axvline(first, color="tab:red", lw=1, label=f"grid_exploited from {first}")
    if entropy is not None:
        a.axhline(entropy, color="k", ls=":", label=f"true entropy {entropy:.3f}")
    a.set(xlabel="iteration", ylabel="nats", title="negative log-likelihood")
    a.legend(fontsize=8)
    _plot_mmd_axes(ax[0, 1], df)
    a = ax[1, 0]
    a.plot(df["iter"], df["lr"])
    a.set(xlabel="iteration", ylabel="learning rate", yscale="log", title="learning rate")
    a = ax[1, 1]
    a.plot(df["iter"], 1e3 * df["time_fwd"], label="forward")
    a.plot(df["iter"], 1e3 * df["time_bwd"], label="backward")
    a.set(xlabel="iteration", ylabel="ms / iteration", title="time per iteration")
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, out_png)


def _plot_mmd_axes(a, df):
    """MMD^2 on a symmetric log axis: linear within +-MMD_LINEAR (shaded), so the unbiased
    estimate's values at and below 0, which mean "no difference within noise", are drawn
    where they are, never clipped; the test MMD^2 of a completed run with its standard error."""
    a.axhspan(-MMD_LINEAR, MMD_LINEAR, color="0.92", zorder=0, label=f"linear scale within ±{MMD_LINEAR:g}")
    a.axhline(0.0, color="k", lw=0.8)
    a.plot(df["iter"], df["val_mmd"], "o-", ms=3, label="val: model samples vs data")
    a.plot(df["iter"], df["train_mmd"], "s-", ms=3, label="val data pulled back vs N(0,I)")
    if "test_mmd" in df and df["test_mmd"].notna().any():
        last = df[df["test_mmd"].notna()].iloc[-1]
        se = last["test_mmd_se"] if "test_mmd_se" in df and math.isfinite(last["test_mmd_se"]) else 0.0
        a.errorbar([last["iter"]], [last["test_mmd"]], yerr=[se], fmt="D", ms=5, capsize=4, color="tab:red",
                   label="test: samples vs test set, ± SE")
    a.set_yscale("symlog", linthresh=MMD_LINEAR)
    a.set(xlabel="iteration", ylabel="MMD$^2$ (unbiased)", title="MMD (0 or below: no difference within noise)")
    a.legend(fontsize=7)


def plot_mmd(csv_path, out_png):
    """The MMD panel of ``plot_optimization`` on its own."""
    df = pd.read_csv(csv_path)
    fig, a = plt.subplots(figsize=(6.5, 4.2), dpi=RUN_DPI)
    _plot_mmd_axes(a, df)
    fig.tight_layout()
    _save(fig, out_png)


def flow_frames(target, snapshots, limit=4.5, gif_duration=0.1, bins=200):
    """The flow frames as files in memory: {``cnf-viz-NNN.jpg``: bytes, ..., ``cnf-viz.gif``: bytes},
    each frame target | samples at t | model density at t.

    One figure is drawn once and only its artists' data change per frame: 2D
    histograms of the target and the samples as images, and the model density
    as one quad mesh over the pulled-back grid (its points keep their grid
    neighbours, since the flow is a diffeomorphism), coloured by the mean
    density of each cell's corners. Each panel has its own colour scale.

    Args:
        target: [m, 2] data samples.
        snapshots: dict from ``model.flow_snapshots``: ``times`` [T], ``samples``
            [T, n, 2], ``density_xy`` [T, g*g, 2] and ``density_logp`` [T, g*g],
            a regular g x g grid at t = 1 (row-major, x fastest) pulled back.
    """
    times = snapshots["times"]
    g = math.isqrt(snapshots["density_logp"].shape[1])
    if g * g != snapshots["density_logp"].shape[1]:
        raise ValueError(f"density_logp has {snapshots['density_logp'].shape[1]} points, not a square grid")
    edges = np.linspace(-limit, limit, bins + 1)
    viridis = plt.get_cmap("viridis")
    cmap = viridis.with_extremes(bad=viridis(0))  # the pulled-back grid need not cover the corners
    fig, ax = plt.subplots(1, 3, figsize=(12, 4.4), dpi=FRAME_DPI)
    ims = [a.imshow(np.zeros((bins, bins)), origin="lower", extent=(-limit, limit, -limit, limit), cmap=cmap,
                    interpolation="nearest") for a in ax[:2]]
    ax[2].set_facecolor(cmap(0))
    mesh = None
    for a in ax:
        a.set_xlim(-limit, limit)
        a.set_ylim(-limit, limit)
        a.set_aspect("equal")
        a.set_xticks([])
        a.set_yticks([])
    ax[0].set_title("target")
    ax[1].set_title(f"samples, t = {times[0]:.2f}")  # every title in place before the layout, so none is cut
    ax[2].set_title(f"model density, t = {times[0]:.2f}")
    _show(ims[0], _hist(target, edges))
    fig.tight_layout()
    files, images = {}, []
    for k, t in enumerate(times):
        _show(ims[1], _hist(snapshots["samples"][k], edges))
        ax[1].set_title(f"samples, t = {t:.2f}")
        if mesh is not None:
            mesh.remove()
        X, Y, C = _density_mesh(snapshots["density_xy"][k], snapshots["density_logp"][k], g, limit)
        mesh = ax[2].pcolormesh(X, Y, C, cmap=cmap, shading="flat")
        _show(mesh, C)
        ax[2].set_title(f"model density, t = {t:.2f}")
        files[frame_name(k)] = _render(fig, "jpg")
        images.append(imageio.imread(files[frame_name(k)]))
    plt.close(fig)
    buf = io.BytesIO()
    imageio.mimsave(buf, images, format="GIF", duration=gif_duration, loop=0)
    files[GIF] = buf.getvalue()
    return files


def save_flow_frames(out_dir, target, snapshots, **kw):
    """Write the flow frames and the GIF of ``flow_frames`` into ``out_dir``, each atomically.
    Returns the frame paths."""
    files = flow_frames(target, snapshots, **kw)
    for name, data in files.items():
        ex.atomic_write(os.path.join(out_dir, name), data)
    return [os.path.join(out_dir, n) for n in files if n != GIF]


def _hist(xy, edges):
    """2D histogram [y, x] of points [n, 2]."""
    return np.histogram2d(xy[:, 1], xy[:, 0], bins=(edges, edges))[0]


def _density_mesh(xy, logp, g, limit):
    """Corners X, Y [g, g] of the pulled-back grid and each cell's density C [g-1, g-1]
    (the mean of its corners' exp(logp)), masked where a corner is lost or far out."""
    xy, dens = xy.reshape(g, g, 2).astype(np.float64), np.exp(logp.reshape(g, g).astype(np.float64))
    bad = ~(np.isfinite(dens) & np.all(np.isfinite(xy) & (np.abs(xy) < 2 * limit), axis=2))
    xy = np.where(bad[..., None], 0.0, xy)
    dens = np.where(bad, np.nan, dens)
    C = 0.25 * (dens[:-1, :-1] + dens[1:, :-1] + dens[:-1, 1:] + dens[1:, 1:])
    return xy[..., 0], xy[..., 1], np.ma.masked_invalid(C)


def _show(im, values):
    """Put values into an image (or mesh), scaled from their own min to max."""
    values = np.ma.masked_invalid(values)
    if isinstance(im, matplotlib.image.AxesImage):
        im.set_data(values)
    lo, hi = (float(values.min()), float(values.max())) if values.count() else (0.0, 1.0)
    im.set_clim(lo, hi if hi > lo else lo + 1.0)


def density_image(logp):
    """exp(logp) [g, g] with non-finite values masked (a lost grid point is not a zero density)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ma.masked_invalid(np.exp(np.asarray(logp, dtype=np.float64)))


def plot_overview(datasets, columns, panels, out_png, out_pdf=None, caption="", panel_in=1.2, dpi=100):
    """A grid of density panels: one row per dataset, one column per entry of ``columns``
    (column headers, e.g. the target, then each solver x precision x scaler cell).

    ``panels[(dataset, column)]`` is a dict with ``title`` (str) and either ``image``
    (a [g, g] density, row y and column x ascending, over [-limit, limit]^2, with
    ``limit``) or ``text`` (a message drawn in a grey panel: diverged, not run, ...).
    Each density has its own colour scale from 0 to its 99.5th percentile, so a sharp
    and a diffuse model are both visible. Writes the PNG (and the PDF) atomically."""
    nr, nc = len(datasets), len(columns)
    left, gap = 0.35, 0.12
    W = left + nc * (panel_in + gap) + 0.1
    # the caption wrapped to the figure's width (about 17 characters per inch at 6.5 pt)
    caption = "\n".join(textwrap.fill(par, width=max(40, int(17 * (W - left)))) for par in caption.split("\n"))
    head, foot = 0.32, (0.2 + 0.11 * (caption.count("\n") + 1)) if caption else 0.1
    row_h = panel_in + 0.4  # the panel and two lines of title
    H = head + nr * row_h + foot
    fig = plt.figure(figsize=(W, H), dpi=dpi)
    cmap = plt.get_cmap("viridis").with_extremes(bad=plt.get_cmap("viridis")(0))
    for i, data in enumerate(datasets):
        for j, col in enumerate(columns):
            x0 = (left + j * (panel_in + gap)) / W
            y0 = 1 - (head + i * row_h + 0.34 + panel_in) / H
            a = fig.add_axes((x0, y0, panel_in / W, panel_in / H))
            a.set_xticks([])
            a.set_yticks([])
            p = panels.get((data, col), {"title": "", "text": "not run"})
            if p.get("image") is not None:
                img, lim = density_image(p["image"]), float(p["limit"])
                hi = float(np.percentile(img.compressed(), 99.5)) if img.count() else 1.0
                a.imshow(img, origin="lower", extent=(-lim, lim, -lim, lim), cmap=cmap, vmin=0.0,
                         vmax=hi if hi > 0 else 1.0, interpolation="nearest")
            else:
                a.set_facecolor("0.88")
                a.text(0.5, 0.5, p.get("text", ""), ha="center", va="center", fontsize=7, transform=a.transAxes,
                       color="0.15")
            a.set_title(p.get("title", ""), fontsize=6.5, pad=2, linespacing=1.1)
            if j == 0:
                a.set_ylabel(data, fontsize=8.5, fontweight="bold", labelpad=3)
            if i == 0:
                fig.text(x0 + 0.5 * panel_in / W, 1 - 0.04 / H, col, ha="center", va="top", fontsize=7,
                         fontweight="bold", linespacing=1.1)
    if caption:
        fig.text(0.5 * left / W, 0.08 / H, caption, ha="left", va="bottom", fontsize=6.5, linespacing=1.2)
    data = {path: _render(fig, fmt) for path, fmt in ((out_png, "png"), (out_pdf, "pdf")) if path is not None}
    plt.close(fig)
    for path, blob in data.items():
        ex.atomic_write(path, blob)


# --- a sweep's summary figure --------------------------------------------------------------
_CELL = ["data", "solver", "precision", "scaler"]  # what makes a cell (summarize.CELL)


def _label(r):
    return f"{r.solver} {r.precision} {r.scaler}"


def paired_labels(g):
    """The row labels of a dataset's paired panel: the cell, its seed pairs, and whether its
    interval is indicative (fewer than 3 pairs) or missing (one pair)."""
    out = []
    for r in g.itertuples():
        if r.reference:
            out.append(f"{_label(r)} (reference)")
        else:
            note = ("; indicative" if getattr(r, "indicative", False) else
                    "; no interval" if r.pairs == 1 else "")  # one pair: the point alone
            out.append(f"{_label(r)} ({r.pairs} pair{'s' if r.pairs != 1 else ''}{note})")
    return out


def _curve_stats(dfs):
    """Validation NLL per iteration over runs: (iters, mean, sd, n); sd is 0 where n == 1."""
    long = pd.concat([d[["iter", "val_loss"]] for d in dfs if len(d)], ignore_index=True)
    g = long.groupby("iter")["val_loss"]
    return g.mean().index.to_numpy(), g.mean().to_numpy(), g.std(ddof=1).fillna(0.0).to_numpy(), g.count().to_numpy()


def plot_summary(cells, runs, curves, out_png):
    """summary.png of a sweep: per dataset, learning curves (mean ± sd over seeds), final test
    NLL (mean ± sd), paired test-NLL difference to float32 (95 % t interval); then time and
    memory (± sd). ``cells`` and ``runs`` are ``summarize``'s tables, ``curves`` each run's CSV."""
    datasets = sorted(cells["data"].unique())
    height = max(3.6, 0.9 + 0.28 * cells.groupby("data").size().max())
    # constrained layout gives each panel's row labels their own room: none runs into a neighbour
    fig, axes = plt.subplots(len(datasets) + 1, 3, figsize=(19, height * (len(datasets) + 1)), squeeze=False,
                             layout="constrained", dpi=SWEEP_DPI)
    for row, data in zip(axes, datasets):
        g = cells[cells["data"] == data].reset_index(drop=True)
        _summary_curves(row[0], data, g, runs, curves)
        y = np.arange(len(g))
        a = row[1]
        a.errorbar(g["test_nll_mean"], y, xerr=g["test_nll_sd"].fillna(0.0), fmt="o", capsize=4)
        a.axvline(toy_data.ENTROPY[data], color="k", ls=":", lw=1)
        a.set_yticks(y, [f"{_label(r)} (n={r.n})" for r in g.itertuples()], fontsize=7)
        a.set(title=f"{data}: final test NLL (mean ± sd over seeds)", xlabel="nats", ylim=(-0.6, len(g) - 0.4))
        _summary_paired(row[2], data, g)
    labels = [f"{r.data}\n{_label(r)}" for r in cells.itertuples()]
    y = np.arange(len(cells))
    a = axes[-1][0]
    a.barh(y, cells["ms_fwd_mean"], xerr=cells["ms_fwd_sd"].fillna(0.0), capsize=3, label="forward")
    a.barh(y, cells["ms_bwd_mean"], left=cells["ms_fwd_mean"], xerr=cells["ms_bwd_sd"].fillna(0.0), capsize=3,
           label="backward")
    a.set(title="time per iteration (mean ± sd)", xlabel="ms")
    a.set_yticks(y, labels, fontsize=7)
    a.legend(fontsize=7)
    a = axes[-1][1]
    a.barh(y, cells["peak_mb_mean"], xerr=cells["peak_mb_sd"].fillna(0.0), capsize=3, color="tab:green")
    a.set(title="peak memory (mean ± sd)", xlabel="MB")
    a.set_yticks(y, labels, fontsize=7)
    fig.delaxes(axes[-1][2])  # the last row has two panels
    _save(fig, out_png)


def ratio_to_float32(g, cols):
    """Per cell of one dataset's rows ``g``: the sum of ``cols`` (e.g. forward + backward ms)
    over the same sum of the float32 (reference) cell of its solver; NaN where either is missing."""
    ref = g[g["reference"].astype(bool)].set_index("solver")
    own = g[list(cols)].sum(axis=1, min_count=len(cols))
    base = g["solver"].map(ref[list(cols)].sum(axis=1, min_count=len(cols)))
    return (own / base).to_numpy(dtype=float)


def plot_answer(cells, out_png):
    """answer.png of a sweep, the comparison at a glance: per dataset, each cell's paired
    test-NLL difference to its float32 twin (the seeds' 95 % t interval and the per-point
    ±1.96 SE), beside its time per iteration and peak memory relative to the float32 cell of
    the same solver (mean over seeds; a ratio, 1 = float32). A cell without a completed seed
    is a row that says so (diverged, running, ...), never a dropped row."""
    datasets = sorted(cells["data"].unique())
    height = max(2.6, 0.7 + 0.3 * cells.groupby("data").size().max())
    fig, axes = plt.subplots(len(datasets), 3, figsize=(16, height * len(datasets)), squeeze=False,
                             layout="constrained", gridspec_kw=dict(width_ratios=[2, 1, 1]), dpi=SWEEP_DPI)
    for row, data in zip(axes, datasets):
        g = cells[cells["data"] == data].reset_index(drop=True)
        _summary_paired(row[0], data, g)
        y = np.arange(len(g))
        for r in g.itertuples():
            if r.n == 0:  # no completed seed: its state in place of a point
                row[0].annotate(r.status, (0.0, r.Index), xytext=(6, 0), textcoords="offset points",
                                va="center", fontsize=7, color="tab:red")
        for a, what, cols, title in ((row[1], "time", ("ms_fwd_mean", "ms_bwd_mean"), "time per iteration"),
                                     (row[2], "memory", ("peak_mb_mean",), "peak memory")):
            ratio = ratio_to_float32(g, cols)
            a.barh(y, np.nan_to_num(ratio), color="tab:green" if what == "memory" else "tab:purple")
            for k, v in enumerate(ratio):
                a.annotate(f"{v:.2f}×" if np.isfinite(v) else "n/a", (np.nan_to_num(v), k), xytext=(3, 0),
                           textcoords="offset points", va="center", fontsize=7)
            a.axvline(1.0, color="k", lw=1)
            a.set_yticks(y, [""] * len(g))
            a.set(xlabel="× its solver's float32", ylim=(-0.6, len(g) - 0.2))
            a.set_title(f"{data}: {title}", fontsize=10)
            a.set_xlim(0, max(1.2, float(np.nanmax(np.r_[ratio, 1.0])) * 1.25))
    _save(fig, out_png)


def _summary_curves(a, data, g, runs, curves):
    """A dataset's validation NLL per cell, mean ± sd over its used runs, above the entropy."""
    floor = toy_data.ENTROPY[data]
    for _, r in g.iterrows():
        mine = runs[(runs[_CELL] == list(r[_CELL])).all(axis=1) & runs["used"]]
        dfs = [curves[p] for p in mine["run"]]
        if not any(len(d) for d in dfs):
            continue
        it, mean, sd, n = _curve_stats(dfs)
        a.errorbar(it, mean, yerr=sd, fmt="o-", ms=3, capsize=2, lw=1,
                   label=f"{_label(r)} (n={n.max()}{', ' + r.status if r.n < r.runs else ''})")
    a.axhline(floor, color="k", ls=":", lw=1, label="true entropy")
    a.set(title=f"{data}: validation NLL (mean ± sd over seeds)", xlabel="iteration", ylabel="nats")
    top = np.nanmax(np.r_[g["val_nll_mean"].to_numpy() + np.nan_to_num(g["val_nll_sd"].to_numpy()), floor + 0.1])
    a.set_ylim(floor - 0.05, floor + 3 * (top - floor))
    a.legend(fontsize=7)


def _summary_paired(a, data, g):
    """A dataset's paired differences to float32: the seeds' interval (open marker where it is
    indicative) and, where the runs' per-point log-likelihoods are at hand, the per-point
    mean ± 1.96 SE."""
    y = np.arange(len(g))
    has_ci = g["diff_ci_low"].notna()
    half_lo = (g["diff_mean"] - g["diff_ci_low"]).where(has_ci, 0.0)
    half_hi = (g["diff_ci_high"] - g["diff_mean"]).where(has_ci, 0.0)
    weak = g["indicative"].astype(bool) if "indicative" in g else pd.Series(False, index=g.index)
    level = f"{g['ci_level'].iloc[0]:.0%}" if "ci_level" in g else "95%"
    paired = g["diff_mean"].notna()  # the reference row has no difference to draw
    for sel, style, label in ((paired & ~weak, dict(fmt="o"), f"seeds: {level} t interval"),
                              (paired & weak, dict(fmt="o", mfc="white"), "seeds: indicative (fewer than 3 pairs)")):
        if sel.any():
            a.errorbar(g["diff_mean"][sel], y[sel.to_numpy()], xerr=[half_lo[sel], half_hi[sel]], capsize=4,
                       color="tab:blue", label=label, **style)
    point = g["point_diff_mean"].notna()  # absent where the runs' test_logp.npy are not in the folder
    if point.any():
        a.errorbar(g["point_diff_mean"][point], y[point.to_numpy()] + 0.2,
                   xerr=g["point_diff_se"][point].fillna(0.0) * 1.96, fmt="s", ms=3, capsize=3,
                   color="tab:orange", label="per point: ±1.96 SE")
    a.axvline(0.0, color="k", lw=1)
    a.set_yticks(y, paired_labels(g), fontsize=7)
    a.set(title=f"{data}: test NLL minus float32 twin", xlabel="nats", ylim=(-0.6, len(g) - 0.2))
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7)
    else:  # nothing paired (no low-precision cell beside a float32 twin): say so, not a blank panel
        a.text(0.5, 0.5, "no paired difference: no low-precision cell beside a completed float32 twin", transform=a.transAxes,
               ha="center", va="center", fontsize=8, color="tab:red")


# --- re-drawing a run ----------------------------------------------------------------------
def csv_figures(run_dir):
    """{name: writer} of the figures drawn from a run's CSV alone."""
    run = ex.RunDir(run_dir)
    args = ex.read_args(run.file("args.csv"))
    entropy = toy_data.ENTROPY.get(args.get("data"))
    return {"optimization_stats.png": lambda: plot_optimization(run.csv, run.file("optimization_stats.png"), entropy,
                                                                run.name),
            "mmd_plot.png": lambda: plot_mmd(run.csv, run.file("mmd_plot.png"))}


def replot(run_dir, device="cpu"):
    """Re-draw a run's figures from its folder: the CSV figures, and for a completed run
    with ``--viz`` the flow frames and GIF from its checkpoint (one solve each way,
    ``density.flow_arrays_from_checkpoint``). Once every figure is drawn, a status.json that
    named missing figures no longer does. Returns the names written."""
    import density

    run = ex.RunDir(run_dir)
    written = []
    for name, draw in csv_figures(run_dir).items():
        draw()
        written.append(name)
    status = ex.read_status(run)
    if status.get("status") in ("completed", "grid_exploited") and ex.read_args(run.file("args.csv")).get("viz") == "True":
        target, snaps = density.flow_arrays_from_checkpoint(run_dir, device)
        written += [os.path.basename(p) for p in save_flow_frames(run.path, target, snaps)] + [GIF]
    if status.get("missing_figures"):
        ex.write_json(run.status, {**status, "missing_figures": []})
    return written


# args.csv entries that say where or how a run was executed, not what it trained
_NOT_A_DIFFERENCE = ("results_dir", "run_dir", "resume", "threads", "device", "gpu", "figures", "viz", "viz_samples",
                     "viz_timesteps", "torch_version", "device_name", "resumed_at_iter")


def default_labels(args, names, most=4):
    """Legend labels for runs with configs ``args`` (dicts from args.csv): the settings in which
    they differ ('lr_schedule=cosine, kinetic=0.001'; at most ``most`` of them, in args.csv order),
    else the folder ``names``."""
    keys = [k for k in args[0] if k not in _NOT_A_DIFFERENCE
            and len({a.get(k) for a in args}) > 1] if len(args) > 1 else []
    keys += [k for a in args[1:] for k in a if k not in args[0] and k not in _NOT_A_DIFFERENCE and k not in keys]
    if not keys:
        return list(names)
    labels = [", ".join(f"{k}={a.get(k, '-')}" for k in keys[:most]) + (", ..." if len(keys) > most else "")
              for a in args]
    return labels if len(set(labels)) == len(labels) else list(names)


GAP_WINDOW = (-0.3, 0.5)  # nats: the compare figure's NLL-gap axis; what lies outside is marked at its edge
GRID_GAP_FLOOR = 1e-7  # |grid_gap| below this is drawn at it (log axis), and the figure says so


def plot_runs(run_dirs, out_png, labels=None, title=""):
    """Validation curves of several runs of one dataset, one colour per run: the
    val NLL's gap to the true entropy, |grid_gap| against each run's threshold,
    val MMD and the learning rate. A run's grid_exploited flag is a vertical line
    in its colour. Without ``labels``, a run is labelled by the settings in which the
    runs differ. Reads each folder's args.csv and CSV only. An axis that cuts values
    off says so on the figure, with the cut values drawn at its edge."""
    runs = [ex.RunDir(d) for d in run_dirs]
    args = [ex.read_args(r.file("args.csv")) for r in runs]
    labels = list(labels) if labels else default_labels(args, [r.name for r in runs])
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    data = {a["data"] for a in args}
    if len(data) != 1:
        raise ValueError(f"the runs are of different datasets ({', '.join(sorted(data))}); compare one at a time")
    entropy = toy_data.ENTROPY[data.pop()]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8), dpi=100)
    frames = [pd.read_csv(r.csv) for r in runs]
    gaps = pd.concat([df["val_loss"] - entropy for df in frames])
    # a gamed run dives by nats and a young one starts a nat above: keep the last hundredths readable
    lo = max(min(0.0, gaps.min()), GAP_WINDOW[0]) - 0.02
    hi = min(max(0.0, gaps.max()), GAP_WINDOW[1]) + 0.02
    flagged, floored = False, False
    for i, (df, cfg, label) in enumerate(zip(frames, args, labels)):
        f, g = _compare_one(ax, df, cfg, label, f"C{i}", entropy, lo, hi)
        flagged, floored = flagged or f, floored or g
    a = ax[0, 0]
    a.axhline(0.0, color="k", ls=":", lw=1, label=f"true entropy {entropy:.4f}")
    a.set_ylim(lo, hi)
    cut = (gaps < lo).any() or (gaps > hi).any()
    a.set(xlabel="iteration", ylabel="val NLL - true entropy (nats)",
          title="validation NLL gap" + (f"\n(axis cut to [{lo:+.2f}, {hi:+.2f}]: triangles mark values beyond it)"
                                        if cut else ""))
    a = ax[0, 1]
    a.set(xlabel="iteration", ylabel="|val NLL - val NLL on 4x the steps|", yscale="log",
          title="|grid_gap| (dotted: each run's --grid_gap_max)"
                + (f"\n(values below {GRID_GAP_FLOOR:g} drawn at {GRID_GAP_FLOOR:g})" if floored else ""))
    a = ax[1, 0]
    a.axhspan(-MMD_LINEAR, MMD_LINEAR, color="0.92", zorder=0, label=f"linear scale within ±{MMD_LINEAR:g}")
    a.axhline(0.0, color="k", lw=0.8)
    a.set_yscale("symlog", linthresh=MMD_LINEAR)
    a.set(xlabel="iteration", ylabel="MMD$^2$ (unbiased)", title="val MMD, samples vs data (0 or below: no difference)")
    ax[1, 1].set(xlabel="iteration", ylabel="learning rate", yscale="log", title="learning rate")
    for a in ax.flat:
        a.legend(fontsize=7)
    caption = "dashed: where a run's grid_exploited flag rose" if flagged else ""
    fig.suptitle("\n".join(t for t in (title, caption) if t), fontsize=10)
    fig.tight_layout()
    _save(fig, out_png)


def _compare_one(ax, df, cfg, label, c, entropy, lo, hi):
    """One run's curves in colour ``c`` on the four panels of ``plot_runs``. Returns (did its
    grid_exploited flag rise, was a |grid_gap| below the axis floor)."""
    gap = df["val_loss"] - entropy
    ax[0, 0].plot(df["iter"], gap.clip(lo, hi), "-", color=c, lw=1, label=label)
    for side, out in ((lo, gap < lo), (hi, gap > hi)):  # cut values: a triangle on the edge
        if out.any():
            ax[0, 0].plot(df["iter"][out], np.full(int(out.sum()), side), "v" if side == lo else "^", color=c, ms=4)
    floored = False
    if "grid_gap" in df and df["grid_gap"].notna().any():
        g = df.dropna(subset=["grid_gap"])
        floored = bool((g["grid_gap"].abs() < GRID_GAP_FLOOR).any())
        ax[0, 1].plot(g["iter"], g["grid_gap"].abs().clip(lower=GRID_GAP_FLOOR), "-", color=c, lw=1, label=label)
        if "grid_gap_max" in cfg:
            ax[0, 1].axhline(float(cfg["grid_gap_max"]), color=c, ls=":", lw=1)
    ax[1, 0].plot(df["iter"], df["val_mmd"], "-", color=c, lw=1, label=label)
    ax[1, 1].plot(df["iter"], df["lr"], "-", color=c, lw=1, label=label)
    flagged = "grid_exploited" in df and bool((df["grid_exploited"] == 1).any())
    if flagged:
        first = df.loc[df["grid_exploited"] == 1, "iter"].iloc[0]
        for a in ax.flat:
            a.axvline(first, color=c, ls="--", lw=0.8)
    return flagged, floored


def main(argv=None):
    """Re-draw the figures of run folders, or (--compare) draw one figure of several runs.
    Exit 0; 2 for bad input (one line, nothing written); 6 for a full disk."""
    p = build_parser()
    args = check_args(p, p.parse_args(argv))
    try:
        if args.compare:
            labels = args.labels.split(",") if args.labels else None
            plot_runs(args.runs, args.compare, labels, args.title)
            print(f"wrote {args.compare}")
        else:
            for d in args.runs:
                print(f"{d}: wrote {', '.join(replot(d, args.device))}")
    except ex.DiskFull:
        raise  # quiet_exits: one line, exit code 6
    except (ValueError, OSError, ex.CheckpointError) as e:  # OSError: a run folder without its CSV yet
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
