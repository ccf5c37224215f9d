"""Fused Triton solve of the hypernetwork CNF with the exact trace.

One launch runs the whole forward solve; the backward sweep runs in a few
launches of many steps each (as many as keep its partial buffer within
``Launch.partial_mb``). Each program owns a block of samples and keeps its state
(z, logp) and, in the backward sweep, its adjoint in registers across all
the steps of a launch (between launches, in a float32 buffer). The time-only part
(the hypernetwork) stays in torch: ``CNF.grid_params`` evaluates it once per
grid, and its table is read here row by row (rows in torchmpnode's stage-time
layout: rk4 step i reads rows 2i, 2i+1, 2i+1, 2i+2; euler step i reads row i).

The plain-torch twin is the torch fast path: ``hyper_trace.hyper_field_trace``
/ ``hyper_field_trace_vjp`` driven by torchmpnode's grid solver. Tests compare
the two (``tests/test_cnf_kernels.py``).

Field (one stage, per sample; ``fused_params`` layout, d = state dimension):
    a = z W2T + B2  [w],  s = sigmoid(a),  terms = s - s^2,
    f = s Uw2T^T + ub  [d],  tr = sum_j terms_j c4_j,  dlogp/dt = -tr.

Precision. States, logp, adjoints and every reduction over samples are
float32. With a low precision L (the autocast dtype: bfloat16 or float16) the
kernels reproduce the rounding points of the torch path under autocast; the
sums inside each point accumulate in float32, as the torch matmuls do.
Forward, per stage:
    1. the state z is rounded to L (autocast casts the matmul operand);
    2. a = z W2T + B2 (sum over d in float32), rounded to L;
    3. s = sigmoid(a) in float32, rounded to L;
    4. terms = s - s*s in float32, rounded to L;
    5. f = s Uw2T^T + ub (sum over the width in float32), rounded to L;
    6. tr = sum_j round_L(terms_j * c4_j), the width sum in float32;
    7. the RK stage combinations and the state update run in float32.
Backward, per stage (cotangents Kz of f and Kl of dlogp, float32):
    8. gf = round_L(Kz), gtr = round_L(-Kl);
    9. gs = gf Uw2T + gtr c4 (sum over d+1 in float32), rounded to L;
   10. O = round_L(gtr c4); ga = round_L(round_L(gs - 2 s O) * terms);
   11. gz = ga W2T^T (sum over the width in float32), rounded to L;
   12. the step's state cotangent sums its stages' gz in float32 (3+2, +1, +0),
       then is added to the float32 adjoint, divided by the scale;
   13. the parameter cotangents z_L ga, ga, gf s, gf, gtr terms are summed
       over the samples in float32.
The one rounding point not reproduced: the torch path rounds each stage's
batch-summed cotangents of W2T, Uw2T and c4 (matmul outputs) to L before
adding them to its float32 accumulator; here those sums stay float32, because
no single program sees the whole batch. It only removes error.
Parameters arrive already rounded to L (the hypernetwork runs under autocast).
float32 (and tfloat32: there is no matmul here) runs every step in float32.

Loss scaling (float16 with a DynamicScaler): a per-block scale. Each program
anchors a power-of-2 scale on its own block's adjoint at the start of the
sweep (max |S a| near ``scaler.target``), takes every step's VJP on S a, and
divides the results by S in float32 (exact). A step whose block results are
not finite is retried in the kernel with S halved, up to
``scaler.max_attempts`` times, after which the solve raises naming the step.
After a good step S doubles while max |S a| stays below target / 2. The
scaler then reports the smallest final block scale and the total number of
block-step retries.

Determinism: each program writes its parameter-cotangent partials for each
stage-time row of a launch once (stage 3 of step i and stage 0 of step i+1 are
summed in registers first), into its own slice of a [programs, rows, R]
buffer, which torch then sums over programs; the row two launches share gets
the two sums in a fixed order. No atomics: identical runs give identical bits.
Saved for backward: the states only, as in the torch path.

NaN and +-inf: every rounding point keeps them as torch's casts do, and the padding
columns of a width below a power of 2 are zeroed where an infinite state or cotangent
would turn their zero weights into NaN; so a NaN or inf reaches the outputs exactly where
the torch path puts it (``tests/test_kernel_nonfinite.py``). The compile check and register
report for a GPU architecture are ``python -m tools.kernel_report``; the launch choices
(samples and warps per program, ...) are ``Launch``, changed only through ``launch_settings``.
"""
import contextlib
import functools
import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend still works; see unavailable_reason()
    triton = None

METHOD_CODES = {"euler": 0, "rk4": 1}
LOW_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernels' rounding: none, bf16, fp16


class Launch(NamedTuple):
    """How the kernels are launched. The results are the same bits under every choice
    (tested); only speed and memory change.

    - ``blocks``: samples per program (forward, backward), by device type. On a GPU 4 and
      4: with 4 warps ptxas for sm_90 spills at most 16 bytes in any variant (triton 3.9),
      against 248 in the float16 backward with 8 samples (``python -m tools.kernel_report
      --compile 90``). Not yet timed on a GPU (``python -m tools.kernel_sweep``). The CPU
      interpreter's cost is per program, so it takes large blocks.
    - ``warps``: warps per program (forward, backward).
    - ``pad_rows``: pad each parameter row of the table (and of the backward's partial
      buffer) to a multiple of 16 floats. A row of R = 2dw + 2w + d floats (770 at the
      standard size) then starts 64-byte aligned, and Triton, which specializes an integer
      argument that is a multiple of 16, can use vector loads and stores for it. Off until
      the sweep's ``options`` part has timed both settings on a GPU.
    - ``partial_mb``: the backward sweep runs in as many launches as keep its partial
      buffer [programs, rows, R] float32 within this many MB: at the standard size (256
      programs, 255 rows of R = 770) 4 launches of up to 32 steps and 51 MB instead of one
      of 201 MB. The buffer then no longer grows with the number of steps.
    - ``stub``: the launches are no-ops that only zero their outputs (scaler statistics:
      scale 1, no retries, no failure), so an iteration times everything else, the host
      side (``bench.py --no-kernels``). The results are meaningless.
    """

    blocks: dict = {"cuda": (4, 4), "cpu": (64, 32)}
    warps: tuple = (4, 4)
    pad_rows: bool = False
    partial_mb: float = 64
    stub: bool = False


DEFAULT_LAUNCH = Launch()
# The launch choices ``tools.kernel_sweep`` times (and ``tools.warm_kernels --tune`` compiles):
# samples and warps per program, and the backward's partial-buffer budgets in MB (1024: one
# launch at the standard size).
SWEEP = {"blocks": (1, 2, 4, 8, 16), "warps": (1, 2, 4), "partial_mb": (16, 64, 1024)}
_launch_now = DEFAULT_LAUNCH  # changed only by launch_settings()
# Fused multiply-adds on (Triton's default up to 3.9; 3.10 turns it off): pinned, so the
# kernels' float32 rounding does not change with the Triton version. nvcc fuses the same
# way in torch's own CUDA kernels.
FP_FUSION = True


def launch():
    """The launch choices in force (a ``Launch``)."""
    return _launch_now


@contextlib.contextmanager
def launch_settings(kernel=None, block=None, warps=None, pad_rows=None, partial_mb=None, stub=None):
    """Launch the kernels with other choices inside the ``with`` block; the previous ones
    come back after it. ``block`` (samples per program, on every device type) and ``warps``
    apply to ``kernel`` ('forward' or 'backward'; None: both); the others as in ``Launch``.
    The one way to change how the kernels launch: no other module sets them."""
    global _launch_now
    before = _launch_now
    slots = (0, 1) if kernel is None else ((0,) if kernel == "forward" else (1,))
    if kernel not in (None, "forward", "backward"):
        raise ValueError(f"kernel is 'forward', 'backward' or None, not {kernel!r}")

    def put(pair, value):
        return tuple(value if k in slots and value is not None else v for k, v in enumerate(pair))

    _launch_now = before._replace(
        blocks={dev: put(b, block) for dev, b in before.blocks.items()}, warps=put(before.warps, warps),
        **{k: v for k, v in (("pad_rows", pad_rows), ("partial_mb", partial_mb), ("stub", stub)) if v is not None})
    try:
        yield _launch_now
    finally:
        _launch_now = before


class KernelError(RuntimeError):
    """A fused kernel failed to compile or launch (one line, with the cause)."""


def _launch(name, kernel, grid, *args, **kw):
    if _launch_now.stub:
        if name == "backward":  # zero the outputs; scaler statistics: scale 1, no retries, no failure
            az, al, part, stats = args[5:9]
            for t in (az, al, part, stats):
                t.zero_()
            stats[:, 0].fill_(1.0)
            stats[:, 2].fill_(-1.0)
        return
    try:
        kernel[grid](*args, enable_fp_fusion=FP_FUSION, **kw)
    except Exception as e:  # compile errors, out of resources, launch failures
        msg = str(e).strip().splitlines()
        raise KernelError(f"the fused {name} kernel failed: {type(e).__name__}: {msg[-1] if msg else ''}") from e


def unavailable_reason(device):
    """None when the fused kernels can run on ``device``, else a one-line reason."""
    device = torch.device(device)
    if triton is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the GPU's compute capability {major}.{minor} is below 8.0, which Triton needs"
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return _interpreter_problem()
        return "the Triton kernels need a CUDA GPU (TRITON_INTERPRET=1 runs them interpreted on the CPU, slowly)"
    return f"the Triton kernels do not run on {device.type}"


@functools.lru_cache(maxsize=1)
def _interpreter_problem():
    """None, or why this triton's interpreter cannot run the kernels: before 3.7 it turns
    a scalar argument (a 1-element array) into a loop bound with int(), which recent
    numpy refuses (TypeError)."""
    import numpy as np

    try:
        int(np.array([1]))
    except TypeError:
        version = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit())
        if version < (3, 7):
            return (f"triton {triton.__version__}'s interpreter cannot run the kernels with numpy {np.__version__} "
                    f"(pip install 'triton>=3.7' for the CPU checks; a GPU does not use the interpreter)")
    return None


def _next_pow2(x):
    return 1 << max(0, (int(x) - 1).bit_length())


def row_stride(d, w):
    """Floats per row of the parameter table: R = 2dw + 2w + d, rounded up to a multiple of
    16 with ``Launch.pad_rows``."""
    R = 2 * d * w + 2 * w + d
    return -(-R // 16) * 16 if _launch_now.pad_rows else R


def pack_params(P):
    """``fused_params`` rows (W2T [S,d,w], B2 [S,w], Uw2T [S,d,w], ub [S,d,1], c4 [S,w])
    -> one float32 table [S, row_stride(d, w)]: [W2T | B2 | Uw2T | c4 | ub | zeros]."""
    W2T, B2, Uw2T, ub, c4 = P
    S, d, w = W2T.shape
    cols = [W2T.reshape(S, -1), B2, Uw2T.reshape(S, -1), c4, ub.reshape(S, -1)]
    pad = row_stride(d, w) - (2 * d * w + 2 * w + d)
    if pad:
        cols.append(B2.new_zeros(S, pad))
    return torch.cat(cols, 1).float().contiguous()


def unpack_params(T, d, w):
    """Inverse of ``pack_params`` (float32, for the cotangent table)."""
    S = T.shape[0]
    W2T, B2, Uw2T, c4, ub = torch.split(T[:, :2 * d * w + 2 * w + d], [d * w, w, d * w, w, d], 1)
    return W2T.reshape(S, d, w), B2, Uw2T.reshape(S, d, w), ub.reshape(S, d, 1), c4


@functools.lru_cache(maxsize=32)
def _prepared(spec, device):
    """Checks of ``spec`` that do not depend on tensors, and the per-step float32
    coefficients [N, 8] on ``device``, computed in double as the torch path does:
    rk4 [h/2, h/2, h, h/6, h/3, h/3, h/6, h]; euler [0, 0, 0, h, 0, 0, 0, h].
    Cached per grid and device: a training loop builds them (and pays the host-to-device
    copy, a sync on a GPU) once. Returns (low precision code, rows of the table, coefficients)."""
    if spec.method not in METHOD_CODES:
        raise ValueError(f"the fused solve implements {', '.join(METHOD_CODES)}; got method {spec.method!r}")
    expected = {"euler": ((0.0,), ((),), (1.0,)),
                "rk4": ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6))}
    if tuple(spec.tab) != expected[spec.method]:
        raise ValueError(f"the fused solve implements the classical {spec.method} tableau only")
    N = len(spec.h)
    layout = [[2 * i, 2 * i + 1, 2 * i + 1, 2 * i + 2] for i in range(N)] if spec.method == "rk4" else [[i] for i in range(N)]
    if [list(r) for r in spec.rows] != layout:
        raise ValueError("the fused solve expects torchmpnode's stage-time row layout")
    low = spec.low_dtype if spec.low_dtype is not None else torch.float32
    if low not in LOW_CODES:
        raise ValueError(f"the fused solve runs float32, bfloat16 or float16; got {low}")
    tab = spec.tab
    coef = []
    for h in spec.h:
        if spec.method == "rk4":
            coef.append([h * tab.a[1][0], h * tab.a[2][1], h * tab.a[3][2], *(h * b for b in tab.b), h])
        else:
            coef.append([0.0, 0.0, 0.0, h * tab.b[0], 0.0, 0.0, 0.0, h])
    coef = torch.tensor(coef, dtype=torch.float64).to(device, torch.float32)
    return LOW_CODES[low], layout[-1][-1] + 1 + (spec.method == "euler"), coef


def check_spec(spec, z, logp, P):
    """Refuse what the kernels do not implement, with one-line reasons. Returns the
    low precision code and the per-step coefficients."""
    if triton is None:
        raise RuntimeError(unavailable_reason(z.device))
    low, rows, coef = _prepared(spec, z.device)
    if P[1].shape[0] != rows:
        raise ValueError("the fused solve expects torchmpnode's stage-time row layout")
    if z.dtype != torch.float32 or logp.dtype != torch.float32:
        raise ValueError(f"the fused solve runs float32 states; got z {z.dtype}, logp {logp.dtype}")
    if z.dim() != 2 or logp.shape != (z.shape[0], 1):
        raise ValueError(f"expected z [n, d] and logp [n, 1]; got {tuple(z.shape)} and {tuple(logp.shape)}")
    if P[0].device != z.device:
        raise ValueError(f"parameters on {P[0].device}, state on {z.device}")
    reason = unavailable_reason(z.device)
    if reason:
        raise RuntimeError(reason)
    return low, coef


def solve_forward(P, z0, logp0, spec):
    """All states of the solve: (z_t [N+1, n, d], logp_t [N+1, n, 1]), float32."""
    low, coef = check_spec(spec, z0, logp0, P)
    n, d = z0.shape
    w = P[1].shape[1]
    N = len(spec.h)
    table = pack_params(P)
    zs = torch.empty(N + 1, n, d, dtype=torch.float32, device=z0.device)
    ls = torch.empty(N + 1, n, 1, dtype=torch.float32, device=z0.device)
    zs[0].copy_(z0)
    ls[0].copy_(logp0)
    if n == 0:
        zs[1:] = z0
        ls[1:] = logp0
        return zs, ls
    block = _launch_now.blocks[z0.device.type][0]
    grid = (triton.cdiv(n, block),)
    _launch(
        "forward", _forward_kernel, grid, zs, ls, table, coef, n, N, table.shape[1], w,
        D=d, DP=_next_pow2(d), WP=_next_pow2(w), BLOCK=block,
        METHOD=METHOD_CODES[spec.method], LOW=low, MASK_W=w != _next_pow2(w), num_warps=_launch_now.warps[0],
    )
    return zs, ls


def _chunk_steps(N, programs, R, rows_per_step):
    """Steps per backward launch: as many as keep the partial buffer [programs, rows, R]
    float32 within ``Launch.partial_mb``, spread evenly over the launches."""
    budget_rows = int(_launch_now.partial_mb * 2**20) // max(1, 4 * programs * R)
    most = max(1, (budget_rows - 1) // rows_per_step)
    launches = -(-N // most)
    return -(-N // launches)


def solve_backward(P, zs, grads_z, grads_l, spec, scaler=None):
    """The adjoint sweep over the whole grid.

    ``zs`` [N+1, n, d]: the saved states; ``grads_z`` [N+1, n, d], ``grads_l``
    [N+1, n, 1]: incoming gradients of the outputs. Returns (adjoint of z0 [n, d],
    adjoint of logp0 [n, 1], dP) with dP the float32 cotangents of the parameter
    rows, shaped like ``P``. A ``scaler`` (DynamicScaler) switches on per-block
    loss scaling and is updated (``scale``, ``overflow_steps``).

    The sweep runs in chunks of steps, one launch each, from the end of the grid
    down; each program carries its adjoint and scale from one chunk to the next
    through ``az``, ``al`` and ``stats``. A chunk's partials are summed over the
    programs before the next launch reuses the buffer; the row that two chunks
    share (rk4: the grid point between them) gets both sums, in a fixed order.
    """
    low, coef = check_spec(spec, zs[0], grads_l[0], P)
    N1, n, d = zs.shape
    N = N1 - 1
    w = P[1].shape[1]
    S_rows = P[1].shape[0]
    table = pack_params(P)
    R = table.shape[1]
    block = _launch_now.blocks[zs.device.type][1]
    programs = triton.cdiv(n, block) if n else 0
    az = grads_z[N].contiguous().clone()  # the adjoint enters the first chunk as the gradient at t_N
    al = grads_l[N].contiguous().clone()
    dP = table.new_zeros(S_rows, R)
    per_step = 2 if spec.method == "rk4" else 1
    steps = _chunk_steps(N, programs, R, per_step) if programs and N else 0
    part = torch.empty(programs, per_step * steps + 1, R, dtype=torch.float32, device=zs.device)
    stats = torch.empty(programs, 3, dtype=torch.float32, device=zs.device)  # scale, retries, failed step
    if steps:
        gz, gl = grads_z.contiguous(), grads_l.contiguous()
        target = scaler.target(d + 1) if scaler is not None else 1.0
        max_attempts = scaler.max_attempts if scaler is not None else 1
        for hi in range(N, 0, -steps):
            lo = max(0, hi - steps)
            _launch(
                "backward", _backward_kernel, (programs,), zs, gz, gl, table, coef, az, al, part, stats,
                n, N, lo, hi, R, w, part.shape[1], float(target), int(max_attempts),
                D=d, DP=_next_pow2(d), WP=_next_pow2(w), BLOCK=block,
                METHOD=METHOD_CODES[spec.method], LOW=low, SCALED=scaler is not None, MASK_W=w != _next_pow2(w),
                num_warps=_launch_now.warps[1],
            )
            rows = per_step * (hi - lo) + 1
            dP[per_step * lo:per_step * lo + rows] += part[:, :rows].sum(0)
    if scaler is not None and steps:
        # left on the device: the solver reads the failed step once, with the gradients' check
        scaler.record_blocks(stats[:, 0], stats[:, 1], stats[:, 2], spec.t_list)
    return az, al, unpack_params(dP, d, w)


if triton is not None:
    MAX_SCALE = tl.constexpr(2.0**126)  # the per-block scale stays a finite float32 power of 2

    # A parameter row is the tuple (W2T [DP, WP], B2 [WP], Uw2T [DP, WP], c4 [WP], ub [DP]),
    # zero padded; its cotangent has the same shape.

    @triton.jit
    def _round(x, LOW: tl.constexpr):
        """Round float32 x to the low precision and back (1 bfloat16, 2 float16), to nearest
        even as torch's casts do: NaN stays NaN, +-inf stays +-inf, and a value past the
        largest finite one becomes +-inf. bfloat16 by its bits, since the interpreter's cast
        truncates: adding 0x7FFF plus the lowest kept bit carries into the kept bits exactly
        when the dropped half is above one half, or one half and the kept bits odd. A NaN
        skips the carry (it would turn the GPU's NaN 0x7FFFFFFF into -0.0, and 0x7F800001
        into inf) and keeps its sign and top payload bits, quieted, as a bfloat16 NaN."""
        if LOW == 1:
            b = x.to(tl.uint32, bitcast=True)
            rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
            nan = ((b | 0x400000) >> 16) << 16
            y = tl.where((b & 0x7FFFFFFF) > 0x7F800000, nan, rounded).to(tl.float32, bitcast=True)
        elif LOW == 2:
            y = x.to(tl.float16).to(tl.float32)  # the conversion rounds to nearest even, in both modes
        else:
            y = x
        return y

    @triton.jit
    def _pow2_floor(x):
        """The largest power of 2 <= x, for positive normal float32 x (exact, by its bits)."""
        b = x.to(tl.uint32, bitcast=True)
        return ((b >> 23) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _amax(a_z, a_l):
        """max |x| over a block's state-shaped a_z [B, DP] and logp-shaped a_l [B]."""
        return tl.maximum(tl.max(tl.max(tl.abs(a_z), axis=1), axis=0), tl.max(tl.abs(a_l), axis=0))

    @triton.jit
    def _row_ptrs(base, WIDTH, D: tl.constexpr, DP: tl.constexpr, WP: tl.constexpr):
        """Pointers to the five parts of the row starting at ``base``, [W2T | B2 | Uw2T | c4 | ub],
        and their masks (the padding of DP and WP is masked out)."""
        cd = tl.arange(0, DP)
        cw = tl.arange(0, WP)
        mw = cw < WIDTH
        md = cd < D
        m2 = md[:, None] & mw[None, :]
        ptrs = (base + cd[:, None] * WIDTH + cw[None, :], base + D * WIDTH + cw,
                base + (D + 1) * WIDTH + cd[:, None] * WIDTH + cw[None, :], base + (2 * D + 1) * WIDTH + cw,
                base + (2 * D + 2) * WIDTH + cd)
        return ptrs, (m2, mw, m2, mw, md)

    @triton.jit
    def _load_row(T, row, R, WIDTH, D: tl.constexpr, DP: tl.constexpr, WP: tl.constexpr):
        """Row ``row`` of the table T [S, R] as a parameter row tuple."""
        ptrs, masks = _row_ptrs(T + row * R, WIDTH, D, DP, WP)
        return (tl.load(ptrs[0], mask=masks[0], other=0.0), tl.load(ptrs[1], mask=masks[1], other=0.0),
                tl.load(ptrs[2], mask=masks[2], other=0.0), tl.load(ptrs[3], mask=masks[3], other=0.0),
                tl.load(ptrs[4], mask=masks[4], other=0.0))

    @triton.jit
    def _store_row(part, row, R, WIDTH, g, D: tl.constexpr, DP: tl.constexpr, WP: tl.constexpr):
        """Write the row cotangent tuple g as row ``row`` of part [rows, R]."""
        ptrs, masks = _row_ptrs(part + row * R, WIDTH, D, DP, WP)
        tl.store(ptrs[0], g[0], mask=masks[0])
        tl.store(ptrs[1], g[1], mask=masks[1])
        tl.store(ptrs[2], g[2], mask=masks[2])
        tl.store(ptrs[3], g[3], mask=masks[3])
        tl.store(ptrs[4], g[4], mask=masks[4])

    @triton.jit
    def _row_add(a, b):
        return a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4]

    @triton.jit
    def _row_mul(a, x):
        return a[0] * x, a[1] * x, a[2] * x, a[3] * x, a[4] * x

    @triton.jit
    def _row_zeros(DP: tl.constexpr, WP: tl.constexpr):
        return (tl.zeros([DP, WP], tl.float32), tl.zeros([WP], tl.float32), tl.zeros([DP, WP], tl.float32),
                tl.zeros([WP], tl.float32), tl.zeros([DP], tl.float32))

    @triton.jit
    def _finite_zero(g):
        """0 when every entry of the row cotangent g is finite, else NaN (x * 0 is NaN for
        NaN and +-inf x)."""
        return (tl.sum(tl.sum(g[0] * 0.0, axis=1), axis=0) + tl.sum(tl.sum(g[2] * 0.0, axis=1), axis=0)
                + tl.sum(g[1] * 0.0, axis=0) + tl.sum(g[3] * 0.0, axis=0) + tl.sum(g[4] * 0.0, axis=0))

    @triton.jit
    def _activations(p, z, WIDTH, LOW: tl.constexpr, WP: tl.constexpr, MASK_W: tl.constexpr):
        """z [B, DP] -> the rounded state zl, s = sigmoid(a) and terms = s - s^2 [B, WP].
        With a width below WP (MASK_W), the padding columns get a = 0: their zero weights
        times an infinite state would be NaN, which the width sums would carry into every
        output of the sample."""
        zl = _round(z, LOW)
        a = _round(tl.sum(zl[:, :, None] * p[0][None, :, :], axis=1) + p[1][None, :], LOW)  # [B, WP]
        if MASK_W:
            a = tl.where((tl.arange(0, WP) < WIDTH)[None, :], a, 0.0)
        s = _round(tl.sigmoid(a), LOW)
        terms = _round(s - s * s, LOW)
        return zl, s, terms

    @triton.jit
    def _field(p, z, WIDTH, LOW: tl.constexpr, WP: tl.constexpr, MASK_W: tl.constexpr):
        """Field and trace of a block at parameter row p: z [B, DP] -> f [B, DP], tr [B]."""
        zl, s, terms = _activations(p, z, WIDTH, LOW, WP, MASK_W)
        f = _round(tl.sum(s[:, None, :] * p[2][None, :, :], axis=2) + p[4][None, :], LOW)  # [B, DP]
        tr = tl.sum(_round(terms * p[3][None, :], LOW), axis=1)  # [B]
        return f, tr

    @triton.jit
    def _field_vjp(p, z, Kz, Kl, WIDTH, D: tl.constexpr, LOW: tl.constexpr, WP: tl.constexpr,
                   MASK_W: tl.constexpr):
        """VJP of one stage for cotangents Kz [B, DP] of f and Kl [B] of dlogp = -tr.
        Returns gz [B, DP] and the block's row cotangent (float32 sums over samples):
        (gW2T [DP, WP], gB2 [WP], gU [DP, WP], gc4 [WP], gub [DP])."""
        W2T = p[0]
        zl, s, terms = _activations(p, z, WIDTH, LOW, WP, MASK_W)
        gf = _round(Kz, LOW)
        gtr = _round(-Kl, LOW)
        gs = _round(tl.sum(gf[:, :, None] * p[2][None, :, :], axis=1) + gtr[:, None] * p[3][None, :], LOW)
        O = _round(gtr[:, None] * p[3][None, :], LOW)
        ga = _round(_round(gs - 2.0 * s * O, LOW) * terms, LOW)  # [B, WP]
        if MASK_W:  # an infinite gf makes gs NaN in the padding columns (zero weights)
            ga = tl.where((tl.arange(0, WP) < WIDTH)[None, :], ga, 0.0)
        gz = _round(tl.sum(ga[:, None, :] * W2T[None, :, :], axis=2), LOW)  # [B, DP]
        if W2T.shape[0] != D:  # likewise an infinite ga in the padding rows of the state
            gz = tl.where((tl.arange(0, W2T.shape[0]) < D)[None, :], gz, 0.0)
        g = (tl.sum(zl[:, :, None] * ga[:, None, :], axis=0), tl.sum(ga, axis=0),
             tl.sum(gf[:, :, None] * s[:, None, :], axis=0), tl.sum(gtr[:, None] * terms, axis=0), tl.sum(gf, axis=0))
        return gz, g

    @triton.jit
    def _rk4_stage_inputs(p0, pm, z, c, WIDTH, LOW: tl.constexpr, WP: tl.constexpr, MASK_W: tl.constexpr):
        """Stages 0-2 of the rk4 step from z [B, DP] with coefficients c (rows p0 at t_i and pm
        at t_i + h/2): the slopes k0, k1, k2 [B, DP] with their traces t0, t1, t2 [B], and the
        stage inputs Y1, Y2, Y3 (Y_{k+1} = z + h a_{k+1,k} k_k), whose slope k3 needs row t_{i+1}."""
        k0, t0 = _field(p0, z, WIDTH, LOW, WP, MASK_W)
        Y1 = z + tl.load(c) * k0
        k1, t1 = _field(pm, Y1, WIDTH, LOW, WP, MASK_W)
        Y2 = z + tl.load(c + 1) * k1
        k2, t2 = _field(pm, Y2, WIDTH, LOW, WP, MASK_W)
        Y3 = z + tl.load(c + 2) * k2
        return k0, t0, k1, t1, k2, t2, Y1, Y2, Y3

    @triton.jit
    def _rk4_step_vjp(p0, pm, p1, z, Y1, Y2, Y3, c, cz, cl, WIDTH,
                      D: tl.constexpr, LOW: tl.constexpr, WP: tl.constexpr, MASK_W: tl.constexpr):
        """VJP of one rk4 step (rows p0 at t_i, pm at t_i + h/2, p1 at t_{i+1}) for the
        cotangents cz [B, DP], cl [B] of its output, in reverse through the tableau:
        Kbar_k = h b_k cot + h a_{k+1,k} Ybar_{k+1}. Returns the cotangent of z summed over
        the stages in float32 in the torch path's order, and the row cotangents of the step's
        rows: g0 (stage 0), gm (stages 2 + 1) and g1 (stage 3)."""
        g3, q3 = _field_vjp(p1, Y3, tl.load(c + 6) * cz, tl.load(c + 6) * cl, WIDTH, D, LOW, WP, MASK_W)
        g2, q2 = _field_vjp(pm, Y2, tl.load(c + 5) * cz + tl.load(c + 2) * g3, tl.load(c + 5) * cl, WIDTH, D, LOW, WP,
                            MASK_W)
        g1, q1 = _field_vjp(pm, Y1, tl.load(c + 4) * cz + tl.load(c + 1) * g2, tl.load(c + 4) * cl, WIDTH, D, LOW, WP,
                            MASK_W)
        g0, q0 = _field_vjp(p0, z, tl.load(c + 3) * cz + tl.load(c) * g1, tl.load(c + 3) * cl, WIDTH, D, LOW, WP,
                            MASK_W)
        return ((g3 + g2) + g1) + g0, q0, _row_add(q2, q1), q3

    @triton.jit
    def _block(pid, n, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
        """This program's samples: indices [B], their mask, the state mask [B, DP] and the
        state offsets [B, DP] within one [n, D] slice."""
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        cd = tl.arange(0, DP)
        mrow = rows < n
        return rows, mrow, mrow[:, None] & (cd[None, :] < D), rows[:, None] * D + cd[None, :]

    @triton.jit
    def _forward_kernel(zs, ls, T, coef, n, N, R, WIDTH,
                        D: tl.constexpr, DP: tl.constexpr, WP: tl.constexpr, BLOCK: tl.constexpr,
                        METHOD: tl.constexpr, LOW: tl.constexpr, MASK_W: tl.constexpr):
        pid = tl.program_id(0)
        rows, mrow, mz, offz = _block(pid, n, D, DP, BLOCK)
        z = tl.load(zs + offz, mask=mz, other=0.0)  # [B, DP], state in registers
        lp = tl.load(ls + rows, mask=mrow, other=0.0)  # [B]
        for i in range(N):
            c = coef + i * 8
            if METHOD == 1:
                k0, t0, k1, t1, k2, t2, Y1, Y2, Y3 = _rk4_stage_inputs(
                    _load_row(T, 2 * i, R, WIDTH, D, DP, WP), _load_row(T, 2 * i + 1, R, WIDTH, D, DP, WP), z, c,
                    WIDTH, LOW, WP, MASK_W)
                k3, t3 = _field(_load_row(T, 2 * i + 2, R, WIDTH, D, DP, WP), Y3, WIDTH, LOW, WP, MASK_W)
                b0 = tl.load(c + 3)
                b1 = tl.load(c + 4)
                b2 = tl.load(c + 5)
                b3 = tl.load(c + 6)
                z = z + (((b0 * k0 + b1 * k1) + b2 * k2) + b3 * k3)
                lp = lp + (((b0 * -t0 + b1 * -t1) + b2 * -t2) + b3 * -t3)
            else:
                k0, t0 = _field(_load_row(T, i, R, WIDTH, D, DP, WP), z, WIDTH, LOW, WP, MASK_W)
                h = tl.load(c + 3)
                z = z + h * k0
                lp = lp + h * -t0
            tl.store(zs + (i + 1) * n * D + offz, z, mask=mz)
            tl.store(ls + (i + 1) * n + rows, lp, mask=mrow)

    # lo and hi change from launch to launch; specializing on them (Triton specializes an
    # integer that is 1 or a multiple of 16) would compile the kernel again for some chunks
    @triton.jit(do_not_specialize=["lo", "hi"])
    def _backward_kernel(zs, gzs, gls, T, coef, az, al, part, stats,
                         n, N, lo, hi, R, WIDTH, CH_ROWS, target, max_attempts,
                         D: tl.constexpr, DP: tl.constexpr, WP: tl.constexpr, BLOCK: tl.constexpr,
                         METHOD: tl.constexpr, LOW: tl.constexpr, SCALED: tl.constexpr, MASK_W: tl.constexpr):
        """Steps hi-1, ..., lo of the sweep. The adjoint enters and leaves through az, al
        (the launcher puts the incoming gradient at t_N there for the first chunk), and the
        scaler state through stats. Parameter rows r(lo)..r(hi) go to this program's slice of
        ``part``, row r(lo) first (r(i) = 2i for rk4, i for euler)."""
        pid = tl.program_id(0)
        rows, mrow, mz, offz = _block(pid, n, D, DP, BLOCK)
        a_z = tl.load(az + offz, mask=mz, other=0.0)  # the adjoint, float32
        a_l = tl.load(al + rows, mask=mrow, other=0.0)
        part = part + pid * CH_ROWS * R
        r0 = lo * (1 + METHOD)  # the first parameter row of this chunk
        scale = tl.full([], 1.0, tl.float32)
        retries = tl.full([], 0.0, tl.float32)  # block-step retries
        failed = tl.full([], -1.0, tl.float32)  # the step where the scale ran out of halvings, or -1
        if SCALED:
            if hi < N:  # a later chunk: go on with the scale (and counts) the previous one left
                scale = tl.load(stats + pid * 3)
                retries = tl.load(stats + pid * 3 + 1)
                failed = tl.load(stats + pid * 3 + 2)
            else:
                amax = _amax(a_z, a_l)
                if amax == 0.0:  # no gradient at the end: anchor on the largest incoming one (as the torch path)
                    for j in range(N):
                        amax = tl.maximum(amax, _amax(tl.load(gzs + j * n * D + offz, mask=mz, other=0.0),
                                                      tl.load(gls + j * n + rows, mask=mrow, other=0.0)))
                if (amax > 0.0) & (amax < float("inf")):
                    scale = _pow2_floor(tl.minimum(target / amax, MAX_SCALE))
        # the cotangent of the row shared by stage 3 of step i and stage 0 of step i+1 (rk4),
        # carried in registers so each row is written once
        carry = _row_zeros(DP, WP)
        for ii in range(hi - lo):
            i = hi - 1 - ii
            c = coef + i * 8
            z_i = tl.load(zs + i * n * D + offz, mask=mz, other=0.0)
            g_z = tl.load(gzs + i * n * D + offz, mask=mz, other=0.0)
            g_l = tl.load(gls + i * n + rows, mask=mrow, other=0.0)
            p0 = _load_row(T, (1 + METHOD) * i, R, WIDTH, D, DP, WP)
            if METHOD == 1:  # the stage inputs, recomputed once per step (they do not depend on the scale)
                pm = _load_row(T, 2 * i + 1, R, WIDTH, D, DP, WP)
                p1 = _load_row(T, 2 * i + 2, R, WIDTH, D, DP, WP)
                _, _, _, _, _, _, Y1, Y2, Y3 = _rk4_stage_inputs(p0, pm, z_i, c, WIDTH, LOW, WP, MASK_W)
            done = 0
            attempts = 0
            while done == 0:  # one pass, or more when a scaled step overflows
                inv = 1.0 / scale
                cz = a_z * scale
                cl = a_l * scale
                if METHOD == 1:
                    ybar, q0, qm, q1 = _rk4_step_vjp(p0, pm, p1, z_i, Y1, Y2, Y3, c, cz, cl, WIDTH, D, LOW, WP, MASK_W)
                else:
                    h = tl.load(c + 3)
                    ybar, q0 = _field_vjp(p0, z_i, h * cz, h * cl, WIDTH, D, LOW, WP, MASK_W)
                new_z = a_z + ybar * inv + g_z
                new_l = a_l + g_l
                ok = True
                if SCALED:
                    # x * 0 is 0 for finite x and NaN otherwise: one sum checks everything this step made
                    chk = tl.sum(tl.sum(new_z * 0.0, axis=1), axis=0) + tl.sum(new_l * 0.0, axis=0) + _finite_zero(q0)
                    if METHOD == 1:
                        chk += _finite_zero(qm) + _finite_zero(q1)
                    ok = (chk == 0.0) | (failed >= 0.0)  # after a failure, stop retrying
                if ok:
                    done = 1
                    a_z = new_z
                    a_l = new_l
                    if METHOD == 1:
                        # row 2i+2: stage 0 of step i+1 (carried) + stage 3 of step i
                        _store_row(part, 2 * i + 2 - r0, R, WIDTH, _row_add(carry, _row_mul(q1, inv)), D, DP, WP)
                        _store_row(part, 2 * i + 1 - r0, R, WIDTH, _row_mul(qm, inv), D, DP, WP)
                    else:
                        _store_row(part, i - r0, R, WIDTH, _row_mul(q0, inv), D, DP, WP)
                    carry = _row_mul(q0, inv)
                    if SCALED:
                        amax = _amax(a_z, a_l)
                        if amax > 0.0:
                            grown = _pow2_floor(tl.minimum(target / amax, MAX_SCALE))
                            if grown > scale:
                                scale = grown
                else:
                    scale = scale * 0.5
                    retries += 1.0
                    attempts += 1
                    if attempts >= max_attempts:  # give up: report the step, finish the sweep without retries
                        failed = tl.maximum(failed, i * 1.0)
                        done = 1
                        a_z = new_z
                        a_l = new_l
        if METHOD == 1:
            _store_row(part, 0, R, WIDTH, carry, D, DP, WP)
        else:  # the chunk's last row belongs to the next step up (euler reads no row N): adds nothing
            _store_row(part, hi - lo, R, WIDTH, _row_zeros(DP, WP), D, DP, WP)
        tl.store(az + offz, a_z, mask=mz)
        tl.store(al + rows, a_l, mask=mrow)
        tl.store(stats + pid * 3, scale)
        tl.store(stats + pid * 3 + 1, retries)
        tl.store(stats + pid * 3 + 2, failed)
