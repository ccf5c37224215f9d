"""The hypernetwork CNF and the two solves everything else uses.

``flow_to_base`` (data -> noise, t: 1 -> 0) gives log-densities; ``flow_from_base``
(noise -> data, t: 0 -> 1) gives samples. Training, validation and
visualization all go through these two functions and ``Integrator``.
"""
import math

import torch
from torch import nn

import torchmpnode
from choices import BACKENDS, SOLVERS, TRACES
from hyper_trace import (
    fused_params,
    hyper_field,
    hyper_field_trace,
    hyper_field_trace_vjp,
    hyper_regularizers,
    hyper_regularizers_vjp,
    sample_noise,
    trace_autograd,
    trace_hutchinson,
)


class HyperNetwork(nn.Module):
    """t -> (W, B, U) of the field: Linear(1,h) tanh Linear(h,h) tanh Linear(h, 3wd+w).
    The output is split as W, U, G (each w*d) and B (w), and U is gated: U * sigmoid(G)."""

    def __init__(self, in_out_dim, hidden_dim, width):
        super().__init__()
        self.width, self.dim = width, in_out_dim
        self.net = nn.Sequential(
            nn.Linear(1, hidden_dim), nn.Tanh(),
            nn.Linear(hidden_dim, hidden_dim), nn.Tanh(),
            nn.Linear(hidden_dim, 3 * width * in_out_dim + width),
        )

    def forward(self, t):
        """t [S] -> W [S,w,d], B [S,w], U [S,w,d]."""
        w, d = self.width, self.dim
        p = self.net(t.reshape(-1, 1).to(self.net[0].weight.dtype))  # [S, 3wd + w]
        S = p.shape[0]
        W = p[:, : w * d].reshape(S, w, d)
        U = p[:, w * d : 2 * w * d].reshape(S, w, d)
        G = p[:, 2 * w * d : 3 * w * d].reshape(S, w, d)
        B = p[:, 3 * w * d :]
        return W, B, U * torch.sigmoid(G)


class CNF(nn.Module):
    """Field of the state (z, logp): dz/dt = (1/w) sum_j U_j tanh(W_j^T z + B_j),
    dlogp/dt = -tr(df/dz), with the trace ``exact`` (closed form), ``autograd``
    (exact, d backward passes) or ``hutchinson`` (stochastic; set the noise with
    ``set_noise`` before a solve).

    With the exact trace it also implements torchmpnode's grid protocol: the
    hypernetwork depends only on t, so ``grid_params`` evaluates it for every
    stage time of a grid at once, ``grid_eval`` computes field and trace from
    one pre-activation, and ``grid_vjp`` is their hand-derived VJP.

    ``backend='triton'`` (exact trace only) hands whole solves to the fused
    kernels of ``cnf_kernels`` through torchmpnode's ``grid_solve`` hooks;
    ``'torch'`` runs the grid protocol above, step by step.
    """

    def __init__(self, in_out_dim=2, hidden_dim=32, width=128, trace="exact", backend="torch"):
        super().__init__()
        if trace not in TRACES:
            raise ValueError(f"unknown trace {trace!r}; choose one of: {', '.join(TRACES)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
        if backend == "triton" and trace != "exact":
            raise ValueError(f"the triton backend fuses the exact trace; it does not run --trace {trace}")
        self.width, self.trace, self.backend = width, trace, backend
        self.hyper_net = HyperNetwork(in_out_dim, hidden_dim, width)
        self.grid_enabled = trace == "exact"
        self.noise = None

    def set_noise(self, like, generator=None, kind="rademacher"):
        """Fix the Hutchinson noise for the next solve (one draw per solve, as in FFJORD)."""
        self.noise = sample_noise(like, kind, generator)

    # --- torchmpnode grid protocol -------------------------------------------------
    def grid_params(self, ts):
        """Time-only parameters at every t in ts [S], in ``fused_params`` layout."""
        return fused_params(*self.hyper_net(ts))

    def grid_eval(self, p, y):
        f, tr, saved = hyper_field_trace(p, y[0])
        if len(y) == 2:
            return (f, -tr), saved
        kin, jac, J = hyper_regularizers(p, f, saved[1])  # the state (z, logp, kinetic, jacobian)
        return (f, -tr, -kin, -jac), (saved, f, J)

    def grid_vjp(self, p, y, saved, cot):
        if len(y) == 2:
            gz, gp = hyper_field_trace_vjp(p, y[0], saved, cot[0], -cot[1])
            return (gz, None), gp
        saved, f, J = saved
        gz, gp = hyper_regularizers_vjp(p, y[0], saved, f, J, cot[0], -cot[1], -cot[2], -cot[3])
        return (gz, None, None, None), gp

    @property
    def grid_solve_enabled(self):
        return self.grid_enabled and self.backend == "triton"

    def grid_solve(self, P, y, spec):
        import cnf_kernels  # triton is optional: imported only by the triton backend

        if len(y) != 2:
            raise ValueError("the fused kernels solve (z, logp) only, not the regularizers' states")
        return cnf_kernels.solve_forward(P, y[0], y[1], spec)

    def grid_solve_vjp(self, P, sol, grads, spec, scaler):
        import cnf_kernels

        az, al, dP = cnf_kernels.solve_backward(P, sol[0], grads[0], grads[1], spec, scaler)
        return (az, al), dP

    # --- plain field: func(t, (z, logp)) for torchdiffeq and general solvers ---------
    def forward(self, t, states):
        z = states[0]
        p = tuple(x[0] for x in self.grid_params(t.reshape(1)))
        if self.trace == "exact":
            return self.grid_eval(p, states)[0]
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_()
            f = hyper_field(p, z)
            if self.trace == "autograd":
                tr = trace_autograd(f, z)
            else:
                if self.noise is None or self.noise.shape != z.shape:
                    raise RuntimeError("hutchinson trace: call set_noise(z) before the solve")
                tr = trace_hutchinson(f, z, self.noise)
        if len(states) == 2:
            return f, -tr
        kin, jac, _ = hyper_regularizers(p, f, hyper_field_trace(p, z)[2][1])  # closed form, whatever the trace
        return f, -tr, -kin, -jac


def resolve_backend(name, device, odeint="torchmpnode", trace="exact", probe=None, regularized=False, method="rk4"):
    """The backend a run uses, and a note for its log.

    'auto' is 'triton' on CUDA when the fused kernels can run there (triton
    imports, the GPU is recent enough, torchmpnode with the exact trace, a
    ``method`` the kernels fuse (classical rk4, euler), no ``regularized``
    penalties), else 'torch'. With ``probe`` (keyword arguments of ``fused_self_test``: the
    run's width, method, low precision and scaling) the kernels must also pass
    their self-test on this machine. An explicit 'triton' that cannot run
    raises a one-line ValueError; 'auto' falls back to 'torch' and says why.
    """
    device = torch.device(device)
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    if name == "torch":
        return "torch", ""
    misfit = None
    if odeint != "torchmpnode":
        misfit = f"it runs torchmpnode's solve, not --odeint {odeint}"
    elif trace != "exact":
        misfit = f"it fuses the exact trace, not --trace {trace}"
    elif regularized:
        misfit = "it solves (z, logp) only, not the states of --kinetic/--jacobian"
    if name == "auto" and device.type != "cuda":
        return "torch", ""
    if misfit:
        if name == "triton":
            raise ValueError(f"--backend triton: {misfit}")
        return "torch", f"backend auto -> torch: the triton backend does not apply ({misfit})"
    import cnf_kernels  # imports triton, which only the triton backend needs

    if method not in cnf_kernels.METHOD_CODES:
        fused = ", ".join(f"classical {m}" if m == "rk4" else m for m in cnf_kernels.METHOD_CODES)
        misfit = f"it fuses {fused}, not --method {method}"
        if name == "triton":
            raise ValueError(f"--backend triton: {misfit}")
        return "torch", f"backend auto -> torch: the triton backend does not apply ({misfit})"
    reason = cnf_kernels.unavailable_reason(device)
    if reason is None and probe is not None:
        reason = fused_self_test(device, **probe)
    if reason:
        if name == "triton":
            raise ValueError(f"--backend triton: {reason}")
        return "torch", f"backend auto -> torch: {reason}"
    return "triton", "fused kernels passed their self-test" if probe is not None else ""


def fused_self_test(device, width, method="rk4", low=None, scaled=False, hidden=8, n=12, points=3):
    """Solve a tiny problem (this width, method, precision and scaling, so the same
    kernel variants compile) with the fused kernels and with the torch path, values
    and gradients. None when they agree, else a one-line reason. The tolerance is
    loose: it catches a broken kernel or toolchain, not roundoff. The global RNG is
    left as it was."""
    import cnf_kernels

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cnf = CNF(2, hidden, width).to(device)
        x = torch.randn(n, 2).to(device)
    out = {}
    try:
        for backend in BACKENDS:
            cnf.backend = backend
            scaler = torchmpnode.DynamicScaler() if scaled else False
            xl = x.clone().requires_grad_()
            with torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None):
                lp = log_prob(cnf, xl, Integrator("torchmpnode", method, points, scaler))
            out[backend] = [lp.detach(), *torch.autograd.grad(lp.sum(), (xl, *cnf.parameters()))]
    except (cnf_kernels.KernelError, RuntimeError) as e:
        return f"the fused kernels failed their self-test: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    tol = 1e-3 if low is None else 0.1
    names = ["log p", "dL/dx"] + [name for name, _ in cnf.named_parameters()]
    for name, a, b in zip(names, out["torch"], out["triton"]):
        err = float((a.double() - b.double()).norm() / a.double().norm().clamp_min(1e-12))
        if not bool(torch.isfinite(b).all()) or err > tol:
            return f"the fused kernels failed their self-test: {name} differs from the torch path by {err:.2g} (relative)"
    return None


# torchdiffeq's name of a torchmpnode scheme where they differ: its fixed-grid 'rk4' is the 3/8 rule
# (tests/test_torchdiffeq_port.py checks them equal in float64). Classical RK4 has no fixed-grid twin there.
TORCHDIFFEQ_METHOD = {"rk4_38": "rk4"}


class Integrator:
    """Which solver and grid every solve of a run uses.

    ``odeint``: 'torchmpnode' or 'torchdiffeq'; ``method``: a name of torchmpnode's METHODS
    (euler, rk4 (classical), midpoint, rk4_38 (Kutta's 3/8 rule)); torchdiffeq gets its own
    name for the scheme (``TORCHDIFFEQ_METHOD``), and its fixed-grid 'rk4' is the 3/8 rule, so
    'rk4' means two schemes there and rk4_38 the same one for both solvers;
    ``num_timesteps``: grid points from t=0 to t=1; ``loss_scaler``: for
    torchmpnode (None auto, False off, or a DynamicScaler); ``adjoint``:
    torchdiffeq's adjoint method; ``tol``: rtol = atol for torchdiffeq's
    adaptive methods (e.g. 'dopri5' with num_timesteps=2: only the end points
    are output, the solver picks its own steps).
    """

    def __init__(self, odeint="torchmpnode", method="rk4", num_timesteps=128, loss_scaler=None, adjoint=False,
                 tol=None):
        if odeint not in SOLVERS:
            raise ValueError(f"unknown odeint {odeint!r}; choose one of: {', '.join(SOLVERS)}")
        if adjoint and odeint != "torchdiffeq":
            raise ValueError("--adjoint is torchdiffeq's adjoint method; it does not apply to torchmpnode")
        if tol is not None and odeint != "torchdiffeq":
            raise ValueError("tolerances apply to torchdiffeq's adaptive methods; torchmpnode is fixed-grid")
        self.odeint, self.method, self.num_timesteps = odeint, method, num_timesteps
        self.loss_scaler, self.adjoint, self.tol = loss_scaler, adjoint, tol
        self._grids = {}

    def grid(self, device, reverse=False, num_points=None):
        """The grid from 0 to 1 (1 to 0 with ``reverse``). The same tensor for the same
        arguments, so torchmpnode reads its values to the host (a sync on a GPU) once."""
        key = (torch.device(device), reverse, num_points or self.num_timesteps)
        if key not in self._grids:
            t = torch.linspace(0.0, 1.0, key[2], device=device)
            self._grids[key] = t.flip(0) if reverse else t
        return self._grids[key]

    def solve(self, func, y0, t):
        if self.odeint == "torchmpnode":
            return torchmpnode.odeint(func, y0, t, method=self.method, loss_scaler=self.loss_scaler)
        import torchdiffeq  # only this solver needs it; it loads scipy.integrate, a second of every start-up

        solve = torchdiffeq.odeint_adjoint if self.adjoint else torchdiffeq.odeint
        tols = {} if self.tol is None else {"rtol": self.tol, "atol": self.tol}
        return solve(func, y0, t, method=TORCHDIFFEQ_METHOD.get(self.method, self.method), **tols)


def _dtype(cnf):
    return next(cnf.parameters()).dtype


def standard_normal_logprob(z):
    """log N(z; 0, I) summed over dimensions: [n, d] -> [n], in float32 or wider."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return -0.5 * (z.shape[1] * math.log(2 * math.pi) + (z * z).sum(1))


def flow_to_base(cnf, x, integ, num_points=None, generator=None, regularize=False):
    """Solve data x [n,d] from t=1 to t=0. Returns (z_t [T,n,d], dlogp_t [T,n,1]);
    index -1 is t=0. dlogp_t is the integral of -tr from 1 to t. With ``regularize``
    also kinetic_t and jacobian_t [T,n,1], the integrals of ||f||^2 and ||df/dz||_F^2
    from t to 1: extra states of the same solve (float32, or float64 for float64)."""
    if cnf.trace == "hutchinson":
        cnf.set_noise(x, generator)
    logp = torch.zeros(x.shape[0], 1, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    y0 = (x, logp, torch.zeros_like(logp), torch.zeros_like(logp)) if regularize else (x, logp)
    return integ.solve(cnf, y0, integ.grid(x.device, reverse=True, num_points=num_points))


def log_prob(cnf, x, integ, generator=None, return_z=False):
    """log p(x) [n] in float32 (float64 for float64 x): log N(z(0)) - dlogp(0).
    With ``return_z`` also the pulled-back points z(0) [n, d]."""
    z_t, dlogp_t = flow_to_base(cnf, x, integ, generator=generator)
    logp = standard_normal_logprob(z_t[-1]) - dlogp_t[-1, :, 0].to(torch.promote_types(x.dtype, torch.float32))
    return (logp, z_t[-1]) if return_z else logp


def nll_and_penalties(cnf, x, integ, generator=None):
    """The training objective's parts from one solve: the mean NLL of x [n,d], and the
    means over x of the kinetic energy and Jacobian Frobenius norm integrals,
    int_0^1 ||f||^2 dt and int_0^1 ||df/dz||_F^2 dt [2] (float32, float64 for float64)."""
    z_t, dlogp_t, kin_t, jac_t = flow_to_base(cnf, x, integ, generator=generator, regularize=True)
    logp = standard_normal_logprob(z_t[-1]) - dlogp_t[-1, :, 0].to(torch.promote_types(x.dtype, torch.float32))
    return -logp.mean(), torch.stack([kin_t[-1].mean(), jac_t[-1].mean()])


def flow_from_base(cnf, z, integ, num_points=None, generator=None):
    """Push base samples z [n,d] from t=0 to t=1. Returns (x_t [T,n,d], dlogp_t [T,n,1])."""
    if cnf.trace == "hutchinson":
        cnf.set_noise(z, generator)
    logp = torch.zeros(z.shape[0], 1, dtype=torch.promote_types(z.dtype, torch.float32), device=z.device)
    return integ.solve(cnf, (z, logp), integ.grid(z.device, num_points=num_points))


def sample(cnf, n, integ, device, generator=None, dim=2):
    """n samples of the model, [n, dim] float32."""
    dev = generator.device if generator is not None else device  # draw where the generator lives
    z = torch.randn(n, dim, generator=generator, device=dev).to(device, _dtype(cnf))
    return flow_from_base(cnf, z, integ, generator=generator)[0][-1].float()


@torch.no_grad()
def flow_snapshots(cnf, integ, num_samples, num_points, device, generator, grid_size=100, limit=4.5):
    """Arrays for the flow animation, at ``num_points`` times from t=0 (noise) to 1 (data).

    samples [T, n, 2]: base samples pushed forward. density_xy [T, g, 2] and
    density_logp [T, g]: a regular grid at t=1 pulled back; at time t_k its
    points sit at z(t_k), where the model density of that time is
    log p_{t_k}(z(t_k)) = log N(z(0)) - (dlogp(0) - dlogp(t_k)).
    """
    z = torch.randn(num_samples, 2, generator=generator).to(device, _dtype(cnf))
    xs, _ = flow_from_base(cnf, z, integ, num_points=num_points, generator=generator)  # t: 0 -> 1
    side = torch.linspace(-limit, limit, grid_size)
    grid = torch.stack(torch.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2).to(device, _dtype(cnf))
    zs, dl = flow_to_base(cnf, grid, integ, num_points=num_points, generator=generator)  # t: 1 -> 0
    logp = standard_normal_logprob(zs[-1]) - (dl[-1] - dl)[..., 0]  # [T, g], t descending
    return {
        "times": torch.linspace(0.0, 1.0, num_points).numpy(),
        "samples": xs.float().cpu().numpy(),
        "density_xy": zs.flip(0).float().cpu().numpy(),
        "density_logp": logp.flip(0).float().cpu().numpy(),
    }
