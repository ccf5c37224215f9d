"""metrics.py: the exact likelihood against closed forms and fine grids, the
discretization gap's convergence, the batched test NLL, and the RUN_DIR command."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import metrics
import toy_data
from model import CNF, Integrator, log_prob

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LinearField(nn.Module):
    """dz/dt = A z, dlogp/dt = -tr(A): the flow is z(t) = expm(A t) z(0), so
    log p(x) = log N(expm(-A) x) - tr(A) exactly."""

    trace = "exact"  # what model.log_prob asks of a field

    def __init__(self, A):
        super().__init__()
        self.A = A

    def forward(self, t, states):
        z, logp = states
        return z @ self.A.T, torch.full_like(logp, -float(torch.trace(self.A)))


def strong_cnf(width=16, gain=8.0, trace="exact"):
    """A CNF whose field is strong enough that coarse grids are visibly wrong."""
    torch.manual_seed(0)
    cnf = CNF(2, 8, width, trace)
    with torch.no_grad():
        cnf.hyper_net.net[4].weight.mul_(gain)
        cnf.hyper_net.net[4].bias.mul_(gain)
    return cnf


def moons(n, seed=0):
    return torch.from_numpy(toy_data.inf_train_gen("moons", n, seed))


def test_exact_log_prob_of_a_linear_field_matches_the_closed_form():
    A = torch.tensor([[0.5, -2.0], [1.5, -0.3]], dtype=torch.float64)  # rotation, shear and expansion
    x = moons(300)
    z0 = x.double() @ torch.linalg.matrix_exp(-A).T
    closed = -0.5 * (2 * math.log(2 * math.pi) + (z0 * z0).sum(1)) - torch.trace(A)
    got = metrics.exact_log_prob(LinearField(A), x)
    assert got.dtype == torch.float64 and got.shape == (300,)
    assert (got - closed).abs().max() < 1e-6
    assert abs(metrics.nll_and_se(got)[0] - float(-closed.mean())) < 1e-6


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_exact_field_agrees_with_a_fine_float64_grid(trace):
    """exact_field copies the trained parameters into a float64 field with the
    closed-form trace, whichever trace the run trained with."""
    cnf = strong_cnf(trace=trace)
    x = moons(128)
    field = metrics.exact_field(cnf)
    assert field.trace == "exact" and next(field.parameters()).dtype == torch.float64
    assert next(cnf.parameters()).dtype == torch.float32  # the trained model is left alone
    exact = metrics.exact_log_prob(field, x)
    fine = log_prob(field, x.double(), Integrator("torchmpnode", "rk4", 256, loss_scaler=False))
    assert (exact - fine).abs().max() < 1e-6


def test_disc_gap_shrinks_with_num_timesteps_and_order():
    cnf = strong_cnf()
    x = moons(256)

    def gap(method, nt):
        with torch.no_grad():
            val_loss, _ = metrics.nll_and_se(log_prob(cnf, x, Integrator("torchmpnode", method, nt, loss_scaler=False)))
        m = metrics.exact_metrics(cnf, x, val_loss)
        assert m["disc_gap"] == pytest.approx(val_loss - m["val_loss_exact"])
        return abs(m["disc_gap"])

    euler = [gap("euler", nt) for nt in (4, 8, 16, 32)]
    print("euler |disc_gap| at 4, 8, 16, 32 grid points:", euler)
    assert euler[0] > 1e-2
    # first order: each doubling of the grid roughly halves the gap
    assert all(1.6 < a / b < 3.5 for a, b in zip(euler, euler[1:])), euler
    rk4 = [gap("rk4", nt) for nt in (4, 8)]
    assert rk4[1] < rk4[0] / 20 and rk4[1] < euler[-1] / 50, (rk4, euler)


def test_test_metrics_batches_and_standard_error():
    cnf = strong_cnf()
    x = moons(1000)
    integ = Integrator("torchmpnode", "rk4", 8, loss_scaler=False)
    m, logp = metrics.test_metrics(cnf, integ, x, "moons")
    whole = log_prob(cnf, x, integ).detach()
    assert logp.shape == (1000,) and logp.dtype == torch.float32
    assert (logp - whole).abs().max() < 1e-5  # batches of EVAL_BATCH give the same numbers
    assert m["test_loss"] == pytest.approx(-float(whole.double().mean()), abs=1e-5)
    assert m["test_loss_se"] == pytest.approx(float(whole.double().std()) / math.sqrt(1000), rel=1e-4)
    assert m["test_gap"] == pytest.approx(m["test_loss"] - toy_data.ENTROPY["moons"])
    # the test MMD: 1000 model samples against the 1000 test points, in 10 blocks of 100
    gen = torch.Generator().manual_seed(5)
    m, _ = metrics.test_metrics(cnf, integ, x, "moons", gen)
    # the exact trace's NLL solve draws no noise, so the samples start from the seed's first draws
    samples = metrics.sample_batched(cnf, 1000, integ, x.device, torch.Generator().manual_seed(5))
    vals = torch.tensor([metrics.mmd2(samples[i:i + 100], x[i:i + 100]) for i in range(0, 1000, 100)],
                        dtype=torch.float64)
    assert m["test_mmd"] == pytest.approx(float(vals.mean()), abs=1e-6)
    assert m["test_mmd_se"] == pytest.approx(float(vals.std()) / math.sqrt(10), rel=1e-6)


def test_block_mmd_is_the_mean_and_standard_error_over_disjoint_blocks():
    a, b = moons(1000, 1), moons(1000, 2)
    mean, se = metrics.block_mmd(a, b, blocks=4)
    vals = torch.tensor([metrics.mmd2(a[i:i + 250], b[i:i + 250]) for i in range(0, 1000, 250)], dtype=torch.float64)
    assert mean == pytest.approx(float(vals.mean()), abs=1e-9) and se == pytest.approx(float(vals.std()) / 2, rel=1e-9)
    assert abs(mean) < 4 * se + 1e-3  # one distribution: about 0, within its error bar
    far, far_se = metrics.block_mmd(a, b + 1.0, blocks=4)
    assert far > mean + 10 * (far_se + se)  # a shifted sample is told apart
    # blocks shrink to keep two points a side; one block has no standard error
    assert metrics.block_mmd(a[:6], b[:6], blocks=10)[0] == pytest.approx(
        float(torch.tensor([metrics.mmd2(a[i:i + 2], b[i:i + 2]) for i in (0, 2, 4)]).double().mean()), abs=1e-7)
    m1, se1 = metrics.block_mmd(a[:3], b[:3])
    assert m1 == pytest.approx(metrics.mmd2(a[:3], b[:3]), abs=1e-9) and math.isnan(se1)
    # a NaN sample (a diverged model) reaches the metric
    bad = a.clone()
    bad[7] = float("nan")
    assert math.isnan(metrics.block_mmd(bad, b)[0])


def test_metrics_command_reproduces_a_runs_exact_likelihood(tmp_path):
    tiny = ["--num_samples", "32", "--num_samples_val", "64", "--num_samples_test", "128", "--num_timesteps", "4",
            "--width", "8", "--hidden_dim", "8", "--niters", "4", "--test_freq", "2", "--no-figures", "--data", "moons"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "cnf.py"), *tiny, "--run_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = json.load(open(tmp_path / "run" / "status.json"))["final"]
    before = sorted(os.listdir(tmp_path / "run"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "metrics.py"), str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert float(words[words.index("val_loss_exact") + 1]) == pytest.approx(final["val_loss_exact"], abs=2e-6)
    assert float(words[words.index("val_loss") + 1]) == pytest.approx(final["val_loss"], abs=2e-6)
    assert sorted(os.listdir(tmp_path / "run")) == before  # it only reads the run folder
    for bad in ([str(tmp_path / "nope")], [str(tmp_path / "run"), "--device", "tpu"]):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "metrics.py"), *bad], capture_output=True,
                              text=True, cwd=str(tmp_path), timeout=300)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "metrics.py: error" in proc.stderr


# The bandwidths docs/metrics.md documents for val_mmd and train_mmd, written out here so that
# the reference below does not read them from the module it checks.
DOCUMENTED_BANDWIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0)


def mmd2_double_loop(x, y, bandwidths):
    """The unbiased MMD^2 written out plainly in float64 Python: the mean kernel over pairs
    i != j within x and within y, minus twice the mean over all x-y pairs, with
    k(a, b) = sum_s exp(-|a - b|^2 / (2 s^2))."""
    x, y = x.double().tolist(), y.double().tolist()

    def k(a, b):
        d2 = sum((ai - bi) ** 2 for ai, bi in zip(a, b))
        return sum(math.exp(-d2 / (2 * s * s)) for s in bandwidths)

    def within(u):
        return sum(k(u[i], u[j]) for i in range(len(u)) for j in range(len(u)) if i != j) / (len(u) * (len(u) - 1))

    between = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return within(x) + within(y) - 2 * between


def test_mmd2_matches_a_float64_double_loop_over_the_documented_bandwidths():
    """Pairwise distances from ~0.05 to ~8, so every bandwidth weighs in: leaving one out,
    or adding one, moves mmd2 by far more than float32 rounding."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 2, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.cat([x[:3] + 0.05 * torch.randn(3, 2, generator=g, dtype=torch.float64),
                   torch.rand(6, 2, generator=g, dtype=torch.float64) * 6 - 3])
    ref = mmd2_double_loop(x, y, DOCUMENTED_BANDWIDTHS)
    got = metrics.mmd2(x, y)
    # each bandwidth's share of the reference, so that a failure says which term is off
    share = {s: round(mmd2_double_loop(x, y, (s,)), 6) for s in DOCUMENTED_BANDWIDTHS}
    assert got == pytest.approx(ref, abs=1e-5), (
        f"mmd2 = {got:.6f}, but the float64 double loop over the documented bandwidths "
        f"{DOCUMENTED_BANDWIDTHS} gives {ref:.6f}; metrics.MMD_BANDWIDTHS = {metrics.MMD_BANDWIDTHS}; "
        f"each bandwidth's term: {share}")
    assert min(abs(v) for v in share.values()) > 1e-3  # each term alone is far above the tolerance
    # explicit bandwidths, a single one, and float32 input take the same formula
    assert metrics.mmd2(x, y, (0.5,)) == pytest.approx(mmd2_double_loop(x, y, (0.5,)), abs=1e-6)
    assert metrics.mmd2(x.float(), y.float()) == pytest.approx(ref, abs=1e-5)
    # two independent samples of one distribution: about 0
    a, b = moons(400, 1), moons(400, 2)
    assert abs(metrics.mmd2(a, b)) < 0.01
    with pytest.raises(ValueError, match="at least 2"):
        metrics.mmd2(x[:1], y)


def test_evaluate_reports_each_metric_of_its_own_quantity():
    """evaluate's dict against the same quantities computed here, each from what its name
    says: val_loss from the validation points' log-densities, nll_gap = val_loss - entropy,
    val_mmd between model samples and fresh data, train_mmd between the pulled-back points
    z(0) and base samples. The generator's draws are replayed in evaluate's order (fresh
    data seed, model samples, base samples), so every value is matched exactly."""
    from model import sample
    from precision import Precision

    cnf, x = strong_cnf(), moons(96, 3)
    integ = Integrator("torchmpnode", "rk4", 6, loss_scaler=False)
    got = metrics.evaluate(cnf, integ, x, "moons", Precision("bfloat16", "cpu"), torch.Generator().manual_seed(5))
    with torch.no_grad():
        logp, z0 = log_prob(cnf, x, integ, return_z=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp_low = log_prob(cnf, x, integ)
        g = torch.Generator().manual_seed(5)
        fresh = torch.from_numpy(toy_data.inf_train_gen("moons", 96, int(torch.randint(2**31, (1,), generator=g))))
        model_x = sample(cnf, 96, integ, "cpu", generator=g)
        base = torch.randn(96, 2, generator=g)
    val_loss, val_loss_se = metrics.nll_and_se(logp)
    want = dict(val_loss=val_loss, val_loss_se=val_loss_se, val_loss_lowp=-float(logp_low.float().mean()),
                nll_gap=val_loss - toy_data.ENTROPY["moons"], val_mmd=metrics.mmd2(model_x, fresh),
                train_mmd=metrics.mmd2(z0, base))
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), f"evaluate()[{k!r}] = {got[k]}, expected {want[k]}"
    # the pairs are far apart, so a metric computed from the wrong pair cannot pass
    assert abs(metrics.mmd2(model_x, base) - want["train_mmd"]) > 0.05
    assert abs(metrics.mmd2(z0, fresh) - want["val_mmd"]) > 0.05
    assert abs(want["val_loss_lowp"] - val_loss) > 1e-4  # bfloat16 autocast really ran
