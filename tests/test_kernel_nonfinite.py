"""NaN and +-inf through the fused kernels.

First the rounding to bfloat16 and float16 alone, on bit patterns, against torch's own
casts. Then whole solves with the GPU's NaN (0x7FFFFFFF, what a GPU writes for every NaN
it makes), numpy's NaN (0x7FC00000) and +-inf in the input samples or in the incoming
cotangents of the states and log-densities: the fused path must give NaN, +inf and -inf
exactly where the torch path does, in the log-densities, the states, the input gradient,
every parameter row's cotangent and the parameters' gradients. The problems are small
(a partial block of samples, a width that is not a power of 2), interpreted on the CPU and
compiled under ``pytest -m cuda``.
"""
import numpy as np
import pytest
import torch

import torchmpnode
from model import CNF, Integrator, flow_to_base, standard_normal_logprob
from test_cnf_kernels import device, need_triton  # noqa: F401  (device is a fixture)

try:
    import triton
    import triton.language as tl

    import cnf_kernels
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _round_kernel(x, y, n, LOW: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        tl.store(y + i, cnf_kernels._round(tl.load(x + i, mask=m, other=0.0), LOW), mask=m)


LOWS = {"bf16": torch.bfloat16, "fp16": torch.float16}
GPU_NAN, NUMPY_NAN, POS_INF, NEG_INF = 0x7FFFFFFF, 0x7FC00000, 0x7F800000, 0xFF800000
PATTERNS = [
    GPU_NAN, 0xFFFFFFFF, NUMPY_NAN, 0xFFC00000,  # NaNs: the GPU's, numpy's, and their negatives
    0x7F800001, 0x7F807FFF, 0x7F808000, 0x7FBFFFFF, 0xFF800001,  # NaNs whose payload a carry would push into inf
    POS_INF, NEG_INF,
    0x7F7FFFFF, 0xFF7FFFFF,  # float32's largest: +-inf in both low precisions
    0x7F7F7FFF, 0x7F7F8000, 0x7F7E8000,  # bfloat16: below the tie at its largest, the tie (to inf), a tie to even
    0x477FEFFF, 0x477FF000, 0x477FE000,  # float16: just below 65520, 65520 (a tie: to inf), 65504 (its largest)
    0x00000001, 0x80000001, 0x00008000, 0x00018000, 0x007FFFFF,  # float32 subnormals, bfloat16 ties among them
    0x33800000, 0x33000000, 0x33C00000, 0x38800000, 0x387FC000,  # float16: 2^-24, 2^-25 and 1.5 2^-24 (ties), 2^-14, below it
    0x3F808000, 0x3F818000, 0x3F801000, 0x3F803000,  # 1 + 2^-8, 1 + 3 2^-8 (bfloat16 ties); 1 + 2^-11, 1 + 3 2^-11 (float16)
    0x00000000, 0x80000000, 0x3F800000, 0xBF800000,
]


def _from_bits(bits):
    return torch.from_numpy(np.asarray(bits, dtype=np.uint32).view(np.float32).copy())


def _bit_patterns():
    """The patterns above, 4096 random ones (NaNs among them), and 1024 random values
    exactly halfway between two bfloat16 values and 1024 between two float16 values."""
    rng = np.random.default_rng(0)
    ties_bf16 = (rng.integers(0, 2**16, 1024, dtype=np.uint64) << 16) | 0x8000
    ties_fp16 = (rng.integers(0, 2**19, 1024, dtype=np.uint64) << 13) | 0x1000
    rand = rng.integers(0, 2**32, 4096, dtype=np.uint64)
    return _from_bits(np.concatenate([np.array(PATTERNS, np.uint64), rand, ties_bf16, ties_fp16]).astype(np.uint32))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy reports float16 overflows
@pytest.mark.parametrize("low", LOWS, ids=list(LOWS))
def test_rounding_matches_torch_casts_bit_for_bit(device, low):
    """The kernels' rounding to the low precision gives what torch's ``.to(low).float()``
    gives, bit for bit, for every non-NaN pattern (infinities, overflow to inf, the largest
    finite values, subnormals, ties to even), and NaN for every NaN, whatever its payload;
    in bfloat16 every result, NaN included, is a bfloat16 value (low 16 bits zero)."""
    dtype = LOWS[low]
    x = _bit_patterns()
    ref = x.to(dtype).float()
    y = torch.empty_like(x, device=device)
    _round_kernel[(triton.cdiv(x.numel(), 128),)](x.to(device), y, x.numel(), LOW=cnf_kernels.LOW_CODES[dtype], BLOCK=128)
    y = y.cpu()
    nan = ref.isnan()
    assert nan[:9].all() and nan.sum() > 9  # the NaN patterns, and random ones
    assert torch.equal(y.isnan(), nan), x[y.isnan() != nan].view(torch.int32)
    bad = y[~nan].view(torch.int32) != ref[~nan].view(torch.int32)
    assert not bad.any(), [(hex(a & 0xFFFFFFFF), hex(b & 0xFFFFFFFF)) for a, b in
                           zip(x[~nan][bad].view(torch.int32)[:5].tolist(), y[~nan][bad].view(torch.int32)[:5].tolist())]
    if dtype == torch.bfloat16:
        assert not (y.view(torch.int32) & 0xFFFF).any()


SIZE = {"cpu": dict(n=12, width=6, points=5), "cuda": dict(n=13, width=100, points=5)}  # partial blocks, masked widths


def _outputs(cnf, x, points, method, backend, low, where, bits, monkeypatch):
    """Log-densities, states, logp, dL/dx, every parameter row's cotangent and the
    parameters' gradients of a loss reading all grid points, with the two ``bits`` patterns
    put into two samples (1 and the last) of the input x, or of the incoming cotangent of
    z_t or logp_t at the middle grid point."""
    cnf.backend = backend
    rows = []
    real = torchmpnode._solver._grid_params_backward

    def record(pb, P, dP):
        rows.extend(d.detach().clone() for d in dP)
        return real(pb, P, dP)

    monkeypatch.setattr(torchmpnode._solver, "_grid_params_backward", record)
    special = _from_bits(bits).to(x.device)
    n = x.shape[0]
    x = x.clone()
    if where == "x":
        x[1, 0], x[n - 1, 1] = special
    x.requires_grad_()
    with torch.autocast(x.device.type, dtype=low or torch.float32, enabled=low is not None):
        z_t, l_t = flow_to_base(cnf, x, Integrator("torchmpnode", method, points, loss_scaler=False))
    logp = standard_normal_logprob(z_t[-1]) - l_t[-1, :, 0]
    g = torch.Generator().manual_seed(7)
    wz, wl, wp = (torch.randn(t.shape, generator=g).to(x.device) for t in (z_t, l_t, logp))
    k = points // 2
    if where == "z_t":
        wz[k, 1, 0], wz[k, n - 1, 1] = special
    elif where == "logp_t":
        wl[k, 1, 0], wl[k, n - 1, 0] = special
    loss = (logp * wp).sum() + (z_t * wz).sum() + (l_t * wl).sum()
    grads = torch.autograd.grad(loss, (x, *cnf.parameters()))
    monkeypatch.undo()
    names = ["log p", "z_t", "logp_t", "dL/dx"] + [f"row cotangent {i}" for i in range(len(rows))]
    names += [f"grad {name}" for name, _ in cnf.named_parameters()]
    return dict(zip(names, [logp.detach(), z_t.detach(), l_t.detach(), *grads[:1], *rows, *grads[1:]]))


def _kinds(t):
    """Where t is NaN, +inf and -inf: [3, *t.shape]."""
    t = t.float()
    return torch.stack([t.isnan(), t.isposinf(), t.isneginf()])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("bits", [(GPU_NAN, NUMPY_NAN), (POS_INF, NEG_INF)], ids=["nan", "inf"])
@pytest.mark.parametrize("where,method", [("x", "rk4"), ("z_t", "rk4"), ("logp_t", "rk4"), ("z_t", "euler")])
def test_nan_and_inf_land_where_the_torch_path_puts_them(device, monkeypatch, where, method, bits):
    sz = SIZE[device.type]
    torch.manual_seed(0)
    cnf = CNF(2, 8, sz["width"]).to(device)
    x = (torch.randn(sz["n"], 2, generator=torch.Generator().manual_seed(1)) * 1.5).to(device)
    for low in (None, torch.bfloat16, torch.float16):
        fused = _outputs(cnf, x, sz["points"], method, "triton", low, where, bits, monkeypatch)
        twin = _outputs(cnf, x, sz["points"], method, "torch", low, where, bits, monkeypatch)
        assert fused.keys() == twin.keys()
        for name in fused:
            kf, kt = _kinds(fused[name]), _kinds(twin[name])
            assert torch.equal(kf, kt), (low, name, "NaN, +inf, -inf counts", kf.flatten(1).sum(1).tolist(),
                                         kt.flatten(1).sum(1).tolist())
        # the specials did reach the outputs: the two samples' input gradients, and with
        # them every parameter's gradient, are not finite; the log-density too, for inputs
        n = sz["n"]
        dx = fused["dL/dx"]
        assert not dx[1].isfinite().all() and not dx[n - 1].isfinite().all() and dx[2:n - 1].isfinite().all(), (low, dx)
        assert not any(v.isfinite().all() for k, v in fused.items() if k.startswith("grad")), low
        if where == "x":
            lp = fused["log p"]
            assert not lp[1].isfinite() and not lp[n - 1].isfinite() and lp[2:n - 1].isfinite().all(), (low, lp)
