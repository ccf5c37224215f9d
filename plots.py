"""Figures of a run, drawn from its CSV or from arrays, never from training state,
so a run can be re-plotted from its folder alone: ``python plots.py RUN_DIR``."""
import io
import math
import os
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")
import imageio.v2 as imageio  # noqa: E402
import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def plot_optimization(csv_path, out_png, entropy=None, title=""):
    """Loss (with the true entropy as the floor), MMD, learning rate and timing."""
    df = pd.read_csv(csv_path)
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
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
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _plot_mmd_axes(a, df):
    a.plot(df["iter"], df["val_mmd"].clip(lower=1e-6), "o-", ms=3, label="samples vs data")
    a.plot(df["iter"], df["train_mmd"].clip(lower=1e-6), "s-", ms=3, label="z(0) of val data vs N(0,I)")
    a.set(xlabel="iteration", ylabel="MMD$^2$ (unbiased, clipped at 1e-6)", yscale="log", title="MMD")
    a.legend(fontsize=8)


def plot_mmd(csv_path, out_png):
    df = pd.read_csv(csv_path)
    fig, a = plt.subplots(figsize=(6, 4))
    _plot_mmd_axes(a, df)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def save_flow_frames(out_dir, target, snapshots, limit=4.5, gif_duration=0.1, bins=200):
    """Frames ``cnf-viz-XXX.jpg`` (target | samples at t | model density at t) and
    the animated ``cnf-viz.gif``. Returns the list of frame paths.

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
    fig, ax = plt.subplots(1, 3, figsize=(12, 4.2))
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
    _show(ims[0], _hist(target, edges))
    fig.tight_layout()
    paths, images = [], []
    for k, t in enumerate(times):
        _show(ims[1], _hist(snapshots["samples"][k], edges))
        ax[1].set_title(f"samples, t = {t:.2f}")
        if mesh is not None:
            mesh.remove()
        X, Y, C = _density_mesh(snapshots["density_xy"][k], snapshots["density_logp"][k], g, limit)
        mesh = ax[2].pcolormesh(X, Y, C, cmap=cmap, shading="flat")
        _show(mesh, C)
        ax[2].set_title(f"model density, t = {t:.2f}")
        path = os.path.join(out_dir, f"cnf-viz-{k:03d}.jpg")
        fig.savefig(path, dpi=70)
        paths.append(path)
        images.append(imageio.imread(path))
    plt.close(fig)
    imageio.mimsave(os.path.join(out_dir, "cnf-viz.gif"), images, duration=gif_duration, loop=0)
    return paths


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
    import experiment

    nr, nc = len(datasets), len(columns)
    left, gap = 0.35, 0.12
    W = left + nc * (panel_in + gap) + 0.1
    # the caption wrapped to the figure's width (about 17 characters per inch at 6.5 pt)
    caption = "\n".join(textwrap.fill(par, width=max(40, int(17 * (W - left)))) for par in caption.split("\n"))
    head, foot = 0.32, (0.2 + 0.11 * (caption.count("\n") + 1)) if caption else 0.1
    row_h = panel_in + 0.4  # the panel and two lines of title
    H = head + nr * row_h + foot
    fig = plt.figure(figsize=(W, H))
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
    for path, fmt in ((out_png, "png"), (out_pdf, "pdf")):
        if path is not None:
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=dpi)
            experiment.atomic_write(path, buf.getvalue())
    plt.close(fig)


def replot(run_dir):
    """Re-draw the CSV figures of a run folder from its files alone."""
    import experiment
    import toy_data

    run = experiment.RunDir(run_dir)
    args = experiment.read_args(run.file("args.csv"))
    plot_optimization(run.csv, run.file("optimization_stats.png"), toy_data.ENTROPY.get(args.get("data")), run.name)
    plot_mmd(run.csv, run.file("mmd_plot.png"))


# args.csv entries that say where or how a run was executed, not what it trained
_NOT_A_DIFFERENCE = ("results_dir", "run_dir", "resume", "threads", "device", "gpu", "viz", "viz_samples",
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


def plot_runs(run_dirs, out_png, labels=None, title=""):
    """Validation curves of several runs of one dataset, one colour per run: the
    val NLL's gap to the true entropy, |grid_gap| against each run's threshold,
    val MMD and the learning rate. A run's grid_exploited flag is a vertical line
    in its colour. Without ``labels``, a run is labelled by the settings in which the
    runs differ. Reads each folder's args.csv and CSV only."""
    import experiment
    import toy_data

    runs = [experiment.RunDir(d) for d in run_dirs]
    args = [experiment.read_args(r.file("args.csv")) for r in runs]
    labels = list(labels) if labels else default_labels(args, [r.name for r in runs])
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    data = {a["data"] for a in args}
    if len(data) != 1:
        raise ValueError(f"the runs are of different datasets ({', '.join(sorted(data))}); compare one at a time")
    entropy = toy_data.ENTROPY[data.pop()]
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    lo, hi = 0.0, 0.0
    for i, (run, cfg, label) in enumerate(zip(runs, args, labels)):
        df = pd.read_csv(run.csv)
        c = f"C{i}"
        gap = df["val_loss"] - entropy
        lo, hi = min(lo, gap.min()), max(hi, gap.quantile(0.98))
        ax[0, 0].plot(df["iter"], gap, "-", color=c, lw=1, label=label)
        if "grid_gap" in df and df["grid_gap"].notna().any():
            g = df.dropna(subset=["grid_gap"])
            ax[0, 1].plot(g["iter"], g["grid_gap"].abs().clip(lower=1e-7), "-", color=c, lw=1, label=label)
            if "grid_gap_max" in cfg:
                ax[0, 1].axhline(float(cfg["grid_gap_max"]), color=c, ls=":", lw=1)
        ax[1, 0].plot(df["iter"], df["val_mmd"], "-", color=c, lw=1, label=label)
        ax[1, 1].plot(df["iter"], df["lr"], "-", color=c, lw=1, label=label)
        if "grid_exploited" in df and (df["grid_exploited"] == 1).any():
            first = df.loc[df["grid_exploited"] == 1, "iter"].iloc[0]
            for a in ax.flat:
                a.axvline(first, color=c, ls="--", lw=0.8)
    a = ax[0, 0]
    a.axhline(0.0, color="k", ls=":", lw=1, label=f"true entropy {entropy:.4f}")
    # a gamed run dives by nats; keep the honest runs' last hundredths readable
    a.set_ylim(max(lo, -0.3) - 0.02, min(hi, 0.5) + 0.02)
    a.set(xlabel="iteration", ylabel="val NLL - true entropy (nats)", title="validation NLL gap (clipped at -0.3)")
    a = ax[0, 1]
    a.set(xlabel="iteration", ylabel="|val NLL - val NLL on 4x the steps|", yscale="log",
          title="|grid_gap| (dotted: each run's --grid_gap_max)")
    # the unbiased estimate scatters around 0 for a good model: linear below 1e-3, log above
    ax[1, 0].set_yscale("symlog", linthresh=1e-3)
    ax[1, 0].set(xlabel="iteration", ylabel="MMD$^2$ (unbiased)", title="val MMD, samples vs data")
    ax[1, 1].set(xlabel="iteration", ylabel="learning rate", yscale="log", title="learning rate")
    for a in ax.flat:
        a.legend(fontsize=7)
    fig.suptitle(title or "dashed: where a run's grid_exploited flag rose", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    experiment.atomic_write(out_png, buf.getvalue())


def main(argv=None):
    import experiment

    p = experiment.OneLineParser(prog="plots.py", description="Re-draw run folders' figures from their files, "
                                 "or compare several runs' validation curves in one figure.")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--compare", metavar="OUT.png", help="draw one comparison figure of the runs instead")
    p.add_argument("--labels", help="comma-separated legend labels for --compare, one per run "
                   "(default: the settings in which the runs differ)")
    p.add_argument("--title", default="", help="the comparison figure's title")
    args = p.parse_args(argv)
    try:
        for d in args.runs:
            if not os.path.isfile(os.path.join(d, "args.csv")):
                raise ValueError(f"{d!r} is not a run folder (no args.csv)")
        if args.compare:
            labels = args.labels.split(",") if args.labels else None
            plot_runs(args.runs, args.compare, labels, args.title)
        else:
            for d in args.runs:
                replot(d)
    except (ValueError, OSError) as e:  # OSError: a run folder without its CSV yet
        print(f"plots.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
