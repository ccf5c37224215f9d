"""The kinetic and Jacobian penalties: the closed-form Jacobian against autograd, float64
gradcheck of ||J||_F^2 and of its hand-derived VJP, the extra states integrated by the
same solve (torchmpnode's grid path, its generic path, torchdiffeq), float32
accumulation in low precision, and cnf.py's flags."""
import math

import pandas as pd
import pytest
import torch
import torchdiffeq

import cnf
import experiment as ex
from hyper_trace import (
    fused_params,
    hyper_field,
    hyper_field_trace,
    hyper_field_trace_vjp,
    hyper_regularizers,
    hyper_regularizers_vjp,
)
from model import CNF, Integrator, flow_to_base, nll_and_penalties, resolve_backend
from test_cnf import TINY, run_inprocess

D64 = torch.float64


def _row(w=6, d=2, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    W, U = torch.randn(1, w, d, generator=g, dtype=dtype), torch.randn(1, w, d, generator=g, dtype=dtype)
    B = torch.randn(1, w, generator=g, dtype=dtype)
    return W, B, U


def _p(W, B, U):
    return tuple(x[0] for x in fused_params(W, B, U))


def test_closed_form_jacobian_equals_autograd():
    W, B, U = _row()
    z = torch.randn(5, 2, dtype=D64)
    p = _p(W, B, U)
    f, _, (s, terms) = hyper_field_trace(p, z)
    kin, jac, J = hyper_regularizers(p, f, terms)
    for i in range(z.shape[0]):
        Ji = torch.autograd.functional.jacobian(lambda x: hyper_field(p, x[None])[0], z[i])  # [d, d]
        # and the field's own form: (1/w) sum_j (1 - tanh^2(W_j.z + B_j)) U_j W_j^T
        a = W[0] @ z[i] + B[0]
        want = ((1 - torch.tanh(a) ** 2)[:, None, None] * U[0][:, :, None] * W[0][:, None, :]).sum(0) / W.shape[1]
        torch.testing.assert_close(J[i].reshape(2, 2), Ji, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(Ji, want, rtol=1e-12, atol=1e-12)
        assert float(jac[i]) == pytest.approx(float((Ji ** 2).sum()), rel=1e-12)
    torch.testing.assert_close(kin[:, 0], (f ** 2).sum(1), rtol=1e-14, atol=0)


def test_gradcheck_of_the_penalties_and_the_hand_vjp_against_autograd():
    W, B, U = (x.requires_grad_() for x in _row(seed=1))
    z = torch.randn(4, 2, dtype=D64, requires_grad=True)

    def outputs(W, B, U, z):
        p = _p(W, B, U)
        f, tr, (s, terms) = hyper_field_trace(p, z)
        kin, jac, _ = hyper_regularizers(p, f, terms)
        return f, tr, kin, jac

    assert torch.autograd.gradcheck(outputs, (W, B, U, z))  # finite differences, float64
    # the hand-derived VJP against autograd through the same closed forms, per fused_params entry
    p = tuple(x.detach().requires_grad_() for x in _p(W, B, U))
    zz = z.detach().requires_grad_()
    f, tr, saved = hyper_field_trace(p, zz)
    kin, jac, J = hyper_regularizers(p, f, saved[1])
    g = torch.Generator().manual_seed(3)
    gf, gtr, gkin, gjac = (torch.randn(x.shape, generator=g, dtype=D64) for x in (f, tr, kin, jac))
    want = torch.autograd.grad((f, tr, kin, jac), (zz, *p), (gf, gtr, gkin, gjac))
    gz, gp = hyper_regularizers_vjp(p, zz.detach(), tuple(x.detach() for x in saved), f.detach(), J.detach(),
                                    gf, gtr, gkin, gjac)
    for name, got, ref in zip(("z", "W2T", "B2", "Uw2T", "ub", "c4"), (gz, *gp), want):
        torch.testing.assert_close(got.reshape(ref.shape), ref, rtol=1e-12, atol=1e-12, msg=name)
    # with zero penalty cotangents it is the plain field-and-trace VJP
    gz0, gp0 = hyper_regularizers_vjp(p, zz.detach(), saved, f.detach(), J.detach(), gf, gtr, 0 * gkin, 0 * gjac)
    gz1, gp1 = hyper_field_trace_vjp(p, zz.detach(), saved, gf, gtr)
    torch.testing.assert_close(gz0, gz1, rtol=1e-14, atol=1e-14)


def _model(dtype=D64, trace="exact"):
    torch.manual_seed(0)
    return CNF(2, 8, 8, trace).to(dtype)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_the_extra_states_are_integrated_by_the_same_solve(method):
    """torchmpnode's grid path (hand VJP), its generic path (autograd through each step) and
    torchdiffeq's euler (same scheme) give the same integrals and gradients; on a fine RK4
    grid they converge to an adaptive float64 reference of the same integrals."""
    x = torch.randn(16, 2, dtype=D64, generator=torch.Generator().manual_seed(4))
    out = {}
    paths = [("grid", "exact", Integrator("torchmpnode", method, 9)),
             ("generic", "autograd", Integrator("torchmpnode", method, 9))]
    if method == "euler":  # torchdiffeq's rk4 is the 3/8 rule, another scheme
        paths.append(("torchdiffeq", "exact", Integrator("torchdiffeq", "euler", 9)))
    for name, trace, integ in paths:
        m = _model(trace=trace)
        nll, pen = nll_and_penalties(m, x, integ)
        loss = nll + 0.3 * pen[0] + 0.7 * pen[1]
        out[name] = [nll.detach(), pen.detach(), *torch.autograd.grad(loss, list(m.parameters()))]
    for name in out:
        for a, b in zip(out["grid"], out[name]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert (out["grid"][1] > 0).all()
    if method == "rk4":
        m = _model()
        with torch.no_grad():
            _, pen = nll_and_penalties(m, x, Integrator("torchmpnode", "rk4", 33))
            sol = torchdiffeq.odeint(m, (x, *(torch.zeros(16, 1, dtype=D64),) * 3),
                                     torch.tensor([1.0, 0.0], dtype=D64), method="dopri5", rtol=1e-10, atol=1e-10)
        ref = torch.stack([sol[2][-1].mean(), sol[3][-1].mean()])
        torch.testing.assert_close(pen, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_float32_accumulation(low):
    m = _model(torch.float32)
    x = torch.randn(32, 2)
    with torch.autocast("cpu", dtype=low):
        z_t, l_t, k_t, j_t = flow_to_base(m, x, Integrator("torchmpnode", "rk4", 5, loss_scaler=False),
                                          regularize=True)
        p = m.grid_params(torch.tensor([0.5]))
        (f, _, kin, jac), _ = m.grid_eval(tuple(a[0] for a in p), (x, None, None, None))
    assert f.dtype == low and kin.dtype == jac.dtype == torch.float32
    assert l_t.dtype == k_t.dtype == j_t.dtype == torch.float32
    with torch.no_grad():
        _, k32, j32 = (t[-1] for t in flow_to_base(m, x, Integrator("torchmpnode", "rk4", 5), regularize=True)[1:])
    rel = float((k_t[-1].detach() - k32).abs().max() / k32.abs().max())
    assert 0 < rel < 0.05  # really computed in the low precision, and still close


def test_the_objective_weights_each_penalty_by_its_own_flag():
    """The training loss is NLL + kinetic * int ||f||^2 + jacobian * int ||df/dz||_F^2, each
    weight on its own integral (swapped weights would still lower both penalties)."""
    from trainer import Trainer

    args = cnf.build_parser().parse_args([*TINY, "--kinetic", "0.3", "--jacobian", "0.05"])
    cnf.validate(args)
    tr = Trainer(args, torch.device("cpu"))
    tr.cnf.double()  # float64: the penalties of an untrained field (~1e-4) stand far above roundoff
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = tr.objective(x)
    nll, pen = nll_and_penalties(tr.cnf, x, tr.integ)
    pen = pen.detach()
    assert abs(float(pen[0] - pen[1])) > 0.2 * float(pen.max())  # a swap changes the weighted sum by > 10 %
    torch.testing.assert_close(loss.detach() - nll.detach(), 0.3 * pen[0] + 0.05 * pen[1], rtol=1e-9, atol=0)
    torch.testing.assert_close(tr.penalties, pen)  # what the CSV's kinetic, jacobian columns log


def test_cnf_logs_the_penalties_and_they_lower_them(tmp_path):
    base = ["--niters", "30", "--test_freq", "10", "--no-figures", "--lr", "0.02"]
    code, plain = run_inprocess(tmp_path / "a", *base)
    code2, reg = run_inprocess(tmp_path / "b", *base, "--kinetic", "1", "--jacobian", "1")
    assert code == code2 == 0
    a, b = pd.read_csv(ex.RunDir(plain).csv), pd.read_csv(ex.RunDir(reg).csv)
    assert a["kinetic"].isna().all() and a["jacobian"].isna().all()
    assert (b["kinetic"] > 0).all() and (b["jacobian"] > 0).all()
    # the penalties' values are those of the trained model's field on its last batch (positive, finite)
    assert all(map(math.isfinite, b[["kinetic", "jacobian"]].to_numpy().ravel()))


def test_regularizers_and_the_triton_backend(tmp_path, capsys):
    assert resolve_backend("auto", "cuda", regularized=True) == (
        "torch", "backend auto -> torch: the triton backend does not apply "
                 "(it solves (z, logp) only, not the states of --kinetic/--jacobian)")
    with pytest.raises(SystemExit) as e:
        cnf.main([*TINY, "--results_dir", str(tmp_path / "r"), "--kinetic", "0.1", "--backend", "triton"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--kinetic/--jacobian" in err
    for bad in (["--kinetic", "-1"], ["--jacobian", "nan"]):
        with pytest.raises(SystemExit) as e:
            cnf.main([*TINY, "--results_dir", str(tmp_path / "r"), *bad])
        assert e.value.code == 2
