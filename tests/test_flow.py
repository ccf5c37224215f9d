"""flow.py, the Python API of a trained run, against the numbers the run itself wrote.

One tiny bfloat16 run of the real cnf.py is trained once (a few seconds); its
test_logp.npy, density.npz, CSV and status.json are the references. bfloat16 is the case
that tells the precisions apart: the run trained under autocast, but computed its test
and validation NLL in float32.
"""
import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

import experiment as ex
import toy_data
from flow import load_flow
from test_cnf import ROOT, TINY, run_dirs


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """The folder of one completed tiny bfloat16 run (on the CPU, one thread, no flow frames),
    trained once per pytest run: under pytest-xdist the first worker to need it trains it in the
    run's shared temporary folder, and the others wait on a lock and reuse it. (xdist_group
    would keep the file on one worker, but it has no effect with pytest 9.) A worker that finds
    no completed run trains its own, so a failed training fails every worker with its cause."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this pytest run's, shared by its workers
    with open(base / "flow_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = [d for d in glob.glob(str(base / "flow_run*" / "*"))
                if ex.read_status(ex.RunDir(d)).get("status") == "completed"]
        if done:
            return done[0]
        results = tempfile.mkdtemp(prefix="flow_run", dir=base)
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "cnf.py"), *TINY, "--precision", "bfloat16",
                               "--no-figures", "--device", "cpu", "--threads", "1", "--results_dir", results],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (folder,) = run_dirs(results)
        return folder


@pytest.fixture(scope="module")
def flow(run):
    return load_flow(run)


def data_sets(config):
    """The run's test and validation sets, regenerated from its config as cnf.py draws them."""
    streams = toy_data.seed_streams(config["seed"])
    return (toy_data.inf_train_gen(config["data"], config["num_samples_test"], streams["test"]),
            toy_data.inf_train_gen(config["data"], config["num_samples_val"], streams["val"]))


def last_row(run):
    return ex.read_csv(ex.RunDir(run).csv)[-1]


def status(run):
    with open(ex.RunDir(run).status) as f:
        return json.load(f)


def copy_run(run, dest, **config):
    """A copy of the run's ckpt.pth in the new folder ``dest``, with ``config`` changed in it."""
    os.makedirs(dest)
    state = ex.load_checkpoint(ex.RunDir(run).ckpt)
    state["config"] = {**state["config"], **config}
    ex.save_checkpoint(os.path.join(dest, "ckpt.pth"), state)
    return str(dest)


def test_log_prob_reproduces_the_runs_test_logp_and_val_loss(run, flow):
    x_test, x_val = data_sets(flow.config)
    logp = flow.log_prob(x_test)
    ref = np.load(ex.RunDir(run).test_logp)
    assert logp.shape == ref.shape == (flow.config["num_samples_test"],)
    assert logp.dtype == torch.float32 and logp.device == torch.device("cpu")
    assert np.abs(logp.numpy() - ref).max() <= 1e-6
    # a bfloat16 run's metrics are float32: the default is float32, and says so
    assert flow.config["precision"] == "bfloat16" and flow.precision == "float32"
    assert -float(flow.log_prob(torch.from_numpy(x_val)).mean()) == pytest.approx(last_row(run)["val_loss"], abs=1e-6)


def test_the_runs_own_precision_gives_its_val_loss_lowp(run, flow):
    _, x_val = data_sets(flow.config)
    low = load_flow(run, precision=flow.config["precision"])
    assert low.precision == "bfloat16"
    lp, lp32 = low.log_prob(x_val), flow.log_prob(x_val)
    assert lp.dtype == torch.float32
    assert -float(lp.mean()) == pytest.approx(last_row(run)["val_loss_lowp"], abs=1e-6)
    assert 0 < (lp - lp32).abs().max() < 0.05  # bfloat16 rounds: different, but close
    f16 = load_flow(run, precision="float16")
    assert f16.precision == "float16" and 0 < (f16.log_prob(x_val) - lp32).abs().max() < 0.05


def test_exact_is_float64_and_the_runs_exact_likelihood(run, flow):
    _, x_val = data_sets(flow.config)
    exact, grid = flow.log_prob(x_val, exact=True), flow.log_prob(x_val)
    assert exact.dtype == torch.float64 and exact.shape == grid.shape
    final = status(run)["final"]
    assert -float(exact.mean()) == pytest.approx(final["val_loss_exact"], abs=1e-9)
    # the grid's NLL is the exact one plus the run's disc_gap, point by point within its scale
    assert float(exact.mean() - grid.double().mean()) == pytest.approx(final["disc_gap"], abs=1e-6)
    assert 0 < (exact - grid.double()).abs().max() < 1e-4


def test_sample_is_reproducible_with_a_generator(flow):
    a = flow.sample(5, generator=torch.Generator().manual_seed(0))
    b = flow.sample(5, generator=torch.Generator().manual_seed(0))
    c = flow.sample(5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (5, 2) and a.dtype == torch.float32 and a.device == torch.device("cpu")
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a, torch.randn(5, 2, generator=torch.Generator().manual_seed(0)))  # pushed, not noise


def test_sample_and_density_reproduce_the_runs_density_npz(run, flow):
    """density.npz: float32 log p on a [G, G] mesh (x fastest) and samples from a seeded generator."""
    npz = np.load(ex.RunDir(run).file("density.npz"))
    g, limit = npz["logp"].shape[0], float(npz["limit"])
    side = torch.linspace(-limit, limit, g)
    mesh = torch.stack(torch.meshgrid(side, side, indexing="xy"), -1)  # [G, G, 2]
    p = flow.density(mesh)
    assert p.shape == (g, g) and p.dtype == torch.float32
    assert np.abs(p.log().numpy() - npz["logp"]).max() <= 1e-5
    seed = flow.config["seed"] * 1_000_003 + 424_242  # density.density_arrays' generator
    xs = flow.sample(len(npz["samples"]), generator=torch.Generator().manual_seed(seed))
    assert np.abs(xs.numpy() - npz["samples"]).max() <= 1e-6


def test_density_is_exp_log_prob_on_a_mesh(flow):
    mesh = np.stack(np.meshgrid(np.linspace(-3, 3, 5), np.linspace(-2, 2, 3)), -1)  # [3, 5, 2] numpy
    p = flow.density(mesh)
    assert p.shape == (3, 5) and p.dtype == torch.float32
    assert torch.allclose(p, flow.log_prob(mesh.reshape(-1, 2)).exp().reshape(3, 5), rtol=1e-6, atol=0)
    pe = flow.density(mesh, exact=True)
    assert pe.shape == (3, 5) and pe.dtype == torch.float64
    assert torch.allclose(pe, flow.log_prob(mesh.reshape(-1, 2), exact=True).exp().reshape(3, 5))
    assert flow.density(mesh[1, 2]).shape == ()  # one point [2]: a scalar
    assert float(flow.density(mesh[1, 2])) == pytest.approx(float(p[1, 2]), rel=1e-6)


def test_a_hutchinson_runs_default_noise_is_that_of_its_test_metrics(run, flow, tmp_path):
    """The run's weights under --trace hutchinson (the parameters are the same): log_prob's
    default noise is the end-of-run test metrics' own, so it gives that run's test_logp."""
    import metrics

    folder = copy_run(run, tmp_path / "hutch", trace="hutchinson")
    hutch = load_flow(folder)
    x_test, _ = data_sets(hutch.config)
    cnf, c, _ = metrics.load_run_model(os.path.join(folder, "ckpt.pth"), "cpu")
    gen = torch.Generator().manual_seed(c["seed"] * 1_000_003 + 999_983)  # trainer.Trainer.final_evaluation's
    _, ref = metrics.test_metrics(cnf, metrics.run_integrator(c), torch.from_numpy(x_test), c["data"], gen)
    lp = hutch.log_prob(x_test)
    assert (lp - ref).abs().max() <= 1e-6 and torch.equal(lp, hutch.log_prob(x_test))
    other = hutch.log_prob(x_test, generator=torch.Generator().manual_seed(7))
    assert 0 < (other - lp).abs().max()  # other noise, another estimate
    # the exact solve uses the closed-form trace: no noise, the exact-trace run's values
    assert torch.allclose(hutch.log_prob(x_test[:16], exact=True), flow.log_prob(x_test[:16], exact=True), rtol=0,
                          atol=1e-9)


def test_config_and_iteration_are_the_runs(run, flow):
    args = ex.read_args(os.path.join(run, "args.csv"))
    assert set(flow.config) <= set(args) and "data" in flow.config
    for k, v in flow.config.items():
        assert ("" if v is None else str(v)) == args[k], k
    assert flow.iter == status(run)["iter"] == flow.config["niters"]
    assert flow.checkpoint == os.path.join(run, "ckpt.pth")
    assert "iteration 4" in repr(flow) and "bfloat16" in repr(flow)


def test_ckpt_valid(run, flow, tmp_path):
    with pytest.raises(ex.CheckpointError) as e:
        load_flow(run, checkpoint="ckpt_valid.pth")
    msg = str(e.value)
    assert "\n" not in msg and "ckpt_valid.pth" in msg and "grid_exploited" in msg
    folder = tmp_path / "flagged"
    shutil.copytree(run, folder)
    shutil.copy(folder / "ckpt.pth", folder / "ckpt_valid.pth")
    valid = load_flow(str(folder), checkpoint="ckpt_valid.pth")
    assert valid.checkpoint.endswith("ckpt_valid.pth")
    x = torch.tensor([[0.5, -1.0], [2.0, 2.0]])
    assert torch.equal(valid.log_prob(x), flow.log_prob(x))


@pytest.mark.parametrize("call, words", [
    (lambda r, f: load_flow(r, checkpoint="last.pth"), "unknown checkpoint"),
    (lambda r, f: load_flow(os.path.join(r, "ckpt.pth")), "is not a folder"),
    (lambda r, f: load_flow(os.path.join(r, "nope")), "is not a folder"),
    (lambda r, f: load_flow(None), "must be a path"),
    (lambda r, f: load_flow(r, precision="fp8"), "unknown precision"),
    (lambda r, f: load_flow(r, precision=16), "precision must be a name"),
    (lambda r, f: load_flow(r, backend="jax"), "unknown backend"),
    (lambda r, f: load_flow(r, device="gpu0"), "is not a device"),
    (lambda r, f: f.sample(0), "positive integer"),
    (lambda r, f: f.sample(-3), "positive integer"),
    (lambda r, f: f.sample(2.5), "positive integer"),
    (lambda r, f: f.sample(True), "positive integer"),
    (lambda r, f: f.log_prob(torch.zeros(3)), "shape [n, 2]"),
    (lambda r, f: f.log_prob(torch.zeros(4, 3)), "shape [n, 2]"),
    (lambda r, f: f.log_prob(torch.zeros(0, 2)), "shape [n, 2]"),
    (lambda r, f: f.log_prob(torch.zeros(2, 2, 2)), "shape [n, 2]"),
    (lambda r, f: f.log_prob(torch.zeros(4, 3), exact=True), "shape [n, 2]"),
    (lambda r, f: f.log_prob("points"), "numbers"),
    (lambda r, f: f.log_prob(torch.zeros(3, 2, dtype=torch.complex64)), "real numbers"),
    (lambda r, f: f.density(torch.zeros(3, 3)), "shape [..., 2]"),
    (lambda r, f: f.density(torch.tensor(1.0)), "shape [..., 2]"),
    (lambda r, f: f.density(torch.zeros(4, 0, 2)), "shape [..., 2]"),
], ids=["checkpoint", "a-file", "missing", "none", "precision", "precision-number", "backend", "device", "n0", "n-3",
        "n2.5", "ntrue", "logp-1d", "logp-3cols", "logp-empty", "logp-3d", "exact-3cols", "logp-str", "complex",
        "density-3cols", "density-scalar", "density-empty"])
def test_bad_arguments_are_one_line_value_errors(run, flow, call, words):
    with pytest.raises(ValueError) as e:
        call(run, flow)
    assert type(e.value) is ValueError and "\n" not in str(e.value) and words in str(e.value)


class RunsCode:
    """Unpickling this makes the folder ``path``: what a loader that runs pickled code would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def damage(run, path, how):
    ckpt = ex.RunDir(run).ckpt
    state = ex.load_checkpoint(ckpt)
    if how == "truncated":
        with open(ckpt, "rb") as f:
            data = f.read()
        ex.atomic_write(path, data[: len(data) // 2])
    elif how == "random bytes":
        ex.atomic_write(path, np.random.default_rng(0).bytes(4096))
    elif how == "empty":
        ex.atomic_write(path, b"")
    elif how == "foreign dict":
        torch.save({"weights": torch.zeros(3), "epoch": 7}, path)
    elif how == "config lacks keys":
        state["config"] = {k: v for k, v in state["config"].items() if k not in ("width", "num_timesteps")}
        ex.save_checkpoint(path, state)
    elif how == "weights do not fit":
        state["config"] = {**state["config"], "width": 16}
        ex.save_checkpoint(path, state)
    elif how == "unknown solver":
        state["config"] = {**state["config"], "odeint": "scipy"}
        ex.save_checkpoint(path, state)
    elif how == "no grid":
        state["config"] = {**state["config"], "num_timesteps": 1}
        ex.save_checkpoint(path, state)


@pytest.mark.parametrize("how, words", [
    ("truncated", "truncated"), ("random bytes", "not a checkpoint"), ("empty", "empty (0 bytes)"),
    ("foreign dict", "not a checkpoint of this kit"), ("config lacks keys", "config lacks width, num_timesteps"),
    ("weights do not fit", "weights do not fit"), ("unknown solver", "odeint 'scipy' is none of"),
    ("no grid", "num_timesteps 1 is not a grid"),
])
def test_a_damaged_checkpoint_is_one_line(run, tmp_path, how, words):
    damage(run, tmp_path / "ckpt.pth", how)
    with pytest.raises(ex.CheckpointError) as e:
        load_flow(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and words in msg and str(tmp_path / "ckpt.pth") in msg


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(run, tmp_path):
    marker = tmp_path / "ran"
    state = ex.load_checkpoint(ex.RunDir(run).ckpt)
    os.makedirs(tmp_path / "evil")
    path = tmp_path / "evil" / "ckpt.pth"
    torch.save({**state, "model": RunsCode(str(marker))}, path)
    with pytest.raises(ex.CheckpointError) as e:
        load_flow(str(tmp_path / "evil"))
    msg = str(e.value)
    # (the wording is experiment.load_checkpoint's: for a blocked module such as os it calls the file damaged)
    assert "\n" not in msg and str(path) in msg
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really runs code when a loader lets it
    assert marker.exists()
