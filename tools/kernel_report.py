"""Compile the fused kernels of ``cnf_kernels.py`` for an NVIDIA GPU without one, and report
each variant's registers and spills.

    python -m tools.kernel_report --compile 90 [--blocks F B] [--warps F B] [--pad-rows] [--width W]

Every variant a run can use (method x precision, and for the backward scaled in float16)
is compiled to a cubin by Triton's own toolchain (ptxas), which catches what the
interpreter lets through (types, loop-carried values). Each variant is specialized as a
launch at the standard size specializes it (batch 1024, width 128, 128 grid points; or
another width):
16-byte aligned tensors, and the integer arguments that are multiples of 16 marked so.
With cuobjdump at hand (it ships with Triton's NVIDIA backend) each line reports
registers per thread and stack bytes (spills).
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import cnf_kernels
from experiment import OneLineParser

STANDARD = dict(n=1024, width=128, points=128, d=2)


def resource_usage(cubin):
    """'REG:n STACK:b' of a cubin, by cuobjdump, or None where it is missing."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.isfile(tool) else shutil.which("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+)", proc.stdout)
    return f"REG:{m.group(1)} STACK:{m.group(2)}" if m else None


def _standard_ints(pad_rows, backward_block, width):
    """The integer arguments of both kernels at the standard size with this width (the
    backward's chunking as ``solve_backward`` picks it with this block and the default
    partial-buffer budget)."""
    n, w, points, d = STANDARD["n"], width, STANDARD["points"], STANDARD["d"]
    N = points - 1
    R = 2 * d * w + 2 * w + d
    R = -(-R // 16) * 16 if pad_rows else R
    programs = -(-n // backward_block)
    steps = cnf_kernels._chunk_steps(N, programs, R, 2)
    return dict(n=n, N=N, R=R, WIDTH=w, CH_ROWS=2 * steps + 1, max_attempts=40)  # DynamicScaler's default


def compile_check(capability=90, out=print, blocks=None, warps=None, pad_rows=False, specialize=True,
                  width=STANDARD["width"]):
    """Compile every kernel variant for compute capability ``capability`` and report it (one
    line each). ``blocks`` / ``warps`` (forward, backward) default to the GPU settings of
    ``cnf_kernels.DEFAULT_LAUNCH``; ``pad_rows`` compiles as a launch with padded parameter rows
    runs (``launch_settings(pad_rows=True)``); ``specialize=False`` compiles without the
    alignment marks (as a launch whose sizes are not multiples of 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = "*fp32"
    fwd = {k: ptr for k in ("zs", "ls", "T", "coef")} | {k: "i32" for k in ("n", "N", "R", "WIDTH")}
    bwd = ({k: ptr for k in ("zs", "gzs", "gls", "T", "coef", "az", "al", "part", "stats")}
           | {k: "i32" for k in ("n", "N", "lo", "hi", "R", "WIDTH", "CH_ROWS")} | {"target": "fp32", "max_attempts": "i32"})
    fb, bb = blocks or cnf_kernels.DEFAULT_LAUNCH.blocks["cuda"]
    ints = _standard_ints(pad_rows, bb, width)
    fw, bw = warps or cnf_kernels.DEFAULT_LAUNCH.warps
    w = ints["WIDTH"]
    variants = []
    for method in cnf_kernels.METHOD_CODES.values():
        for low in cnf_kernels.LOW_CODES.values():
            c = dict(D=2, DP=2, WP=cnf_kernels._next_pow2(w), METHOD=method, LOW=low, MASK_W=w != cnf_kernels._next_pow2(w))
            variants.append((cnf_kernels._forward_kernel, fwd, c | dict(BLOCK=fb), fw))
            variants.append((cnf_kernels._backward_kernel, bwd, c | dict(BLOCK=bb, SCALED=low == 2), bw))
    for fn, sig, consts, nw in variants:
        # what the launcher's specialization marks: aligned pointers, and integers that are
        # multiples of 16 (lo and hi are never specialized)
        aligned = [k for k, v in sig.items() if specialize and (v == ptr or (v == "i32" and ints.get(k, 1) % 16 == 0))]
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
        src = ASTSource(fn=fn, signature=sig | {k: "constexpr" for k in consts}, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                           options={"num_warps": nw, "enable_fp_fusion": cnf_kernels.FP_FUSION})
        usage = resource_usage(k.asm["cubin"])
        out(f"{fn.__name__} {consts} warps={nw}: {len(k.asm['cubin'])} bytes of cubin" + (f", {usage}" if usage else ""))


def main(argv=None):
    """Compile-check every variant for one GPU architecture and print its report; 2 for bad input."""
    p = OneLineParser(prog="python -m tools.kernel_report",
                      description="Compile-check the fused kernels for a GPU architecture (no GPU needed).")
    p.add_argument("--compile", type=int, default=90, metavar="SM", help="compute capability, e.g. 90 for H100/H200")
    p.add_argument("--blocks", type=int, nargs=2, default=None, metavar=("FWD", "BWD"),
                   help=f"samples per program (default {cnf_kernels.DEFAULT_LAUNCH.blocks['cuda']})")
    p.add_argument("--warps", type=int, nargs=2, default=None, metavar=("FWD", "BWD"),
                   help=f"warps per program (default {cnf_kernels.DEFAULT_LAUNCH.warps})")
    p.add_argument("--pad-rows", action="store_true", help="parameter rows padded to 16 floats (Launch.pad_rows)")
    p.add_argument("--width", type=int, default=STANDARD["width"],
                   help="hidden width (not a power of 2: the masked variants)")
    a = p.parse_args(argv)
    if cnf_kernels.triton is None:
        p.error("triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    for name, v in (("--blocks", a.blocks), ("--warps", a.warps)):
        if v and any(x < 1 or x & (x - 1) for x in v):
            p.error(f"{name} takes powers of 2")
    if a.width < 1:
        p.error("--width must be >= 1")
    compile_check(a.compile, blocks=a.blocks, warps=a.warps, pad_rows=a.pad_rows, width=a.width)
    return 0


if __name__ == "__main__":
    sys.exit(main())
