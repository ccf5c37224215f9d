"""Figures of a run, drawn from its CSV or from arrays, never from training state,
so a run can be re-plotted from its folder alone: ``python plots.py RUN_DIR``."""
import os
import sys

import matplotlib

matplotlib.use("Agg")
import imageio.v2 as imageio  # noqa: E402
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


def save_flow_frames(out_dir, target, snapshots, limit=4.5, gif_duration=0.1):
    """Frames ``cnf-viz-XXX.jpg`` (target | samples at t | model density at t) and
    the animated ``cnf-viz.gif``. Returns the list of frame paths.

    Args:
        target: [m, 2] data samples.
        snapshots: dict from ``model.flow_snapshots``: ``times`` [T], ``samples``
            [T, n, 2], ``density_xy`` [T, g, 2], ``density_logp`` [T, g].
    """
    times = snapshots["times"]
    rng = [[-limit, limit], [-limit, limit]]
    paths, images = [], []
    for k, t in enumerate(times):
        fig, ax = plt.subplots(1, 3, figsize=(12, 4.2))
        ax[0].hist2d(*target.T, bins=200, range=rng, cmap="viridis")
        ax[0].set_title("target")
        ax[1].hist2d(*snapshots["samples"][k].T, bins=200, range=rng, cmap="viridis")
        ax[1].set_title(f"samples, t = {t:.2f}")
        xy, logp = snapshots["density_xy"][k], snapshots["density_logp"][k]
        ok = np.isfinite(logp) & np.all(np.abs(xy) < 2 * limit, axis=1)
        ax[2].set_facecolor(plt.get_cmap("viridis")(0))  # the pulled-back grid need not cover the corners
        ax[2].tricontourf(xy[ok, 0], xy[ok, 1], np.exp(logp[ok]), 100, cmap="viridis")
        ax[2].set_title(f"model density, t = {t:.2f}")
        for a in ax:
            a.set_xlim(-limit, limit)
            a.set_ylim(-limit, limit)
            a.set_aspect("equal")
            a.set_xticks([])
            a.set_yticks([])
        fig.tight_layout()
        path = os.path.join(out_dir, f"cnf-viz-{k:03d}.jpg")
        fig.savefig(path, dpi=70)
        plt.close(fig)
        paths.append(path)
        images.append(imageio.imread(path))
    imageio.mimsave(os.path.join(out_dir, "cnf-viz.gif"), images, duration=gif_duration, loop=0)
    return paths


def replot(run_dir):
    """Re-draw the CSV figures of a run folder from its files alone."""
    import experiment
    import toy_data

    run = experiment.RunDir(run_dir)
    args = experiment.read_args(run.file("args.csv"))
    plot_optimization(run.csv, run.file("optimization_stats.png"), toy_data.ENTROPY.get(args.get("data")), run.name)
    plot_mmd(run.csv, run.file("mmd_plot.png"))


if __name__ == "__main__":
    for d in sys.argv[1:]:
        replot(d)
