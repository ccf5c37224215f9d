"""The names a run chooses from, as plain data, and the rule that picks the loss
scalers from them: no torch here, so the command line checks its flags (and answers
``--help``) before torch loads, and shell scripts read them (``python3 choices.py
precisions``).

``PRECISIONS`` is the one table of precisions: cnf.py's ``--precision``, the autocast
dtype (``precision.py``), bench.py's paths, the kernel tools' variants and run_cnf.sh's
checks all come from it. The solvers, traces and backends are implemented in
``model.py`` (and ``cnf_kernels.py``); the datasets, schedules and fixed-grid methods
have their own tables in ``toy_data.py``, ``schedule.py`` and ``torchmpnode/methods.py``.
"""
import sys
from typing import NamedTuple


class PrecisionSpec(NamedTuple):
    autocast: str = None  # torch dtype the model runs in under autocast; None: no autocast (float32)
    tag: str = ""  # its suffix in bench.py's paths (torchmpnode-bf16); "" for float32
    tf32: bool = False  # TF32 matmuls on CUDA
    cpu_twin: str = None  # on a CPU it computes exactly like this precision (None: like no other)


PRECISIONS = {
    "float32": PrecisionSpec(),
    "tfloat32": PrecisionSpec(tag="tf32", tf32=True, cpu_twin="float32"),  # TF32 is a CUDA matmul mode
    "bfloat16": PrecisionSpec("bfloat16", "bf16"),
    "float16": PrecisionSpec("float16", "fp16"),
}
SOLVERS = ("torchdiffeq", "torchmpnode")
TRACES = ("exact", "autograd", "hutchinson")
BACKENDS = ("torch", "triton")  # who runs torchmpnode's grid solve of the exact-trace field


def scaler_flags(odeint, precision, no_grad_scaler=False, no_dynamic_scaler=False, grad_scaler=False):
    """(GradScaler on?, DynamicScaler on?) for a run's flags: the one place this is decided.
    Only float16 is scaled: torchdiffeq with GradScaler (``no_grad_scaler`` turns it off),
    torchmpnode with its DynamicScaler (``no_dynamic_scaler``); ``grad_scaler`` forces
    GradScaler on (e.g. torchmpnode without its DynamicScaler)."""
    fp16 = PRECISIONS[precision].autocast == "float16"
    use_grad = fp16 and ((odeint == "torchdiffeq" and not no_grad_scaler) or grad_scaler)
    use_dynamic = fp16 and odeint == "torchmpnode" and not no_dynamic_scaler
    return use_grad, use_dynamic


def scaler_label(*args, **kw):
    """'none', 'grad', 'dynamic' or 'grad+dynamic'."""
    use_grad, use_dynamic = scaler_flags(*args, **kw)
    return "+".join(n for n, on in (("grad", use_grad), ("dynamic", use_dynamic)) if on) or "none"


def cpu_precisions():
    """The precisions that compute differently from each other on a CPU."""
    return tuple(p for p, spec in PRECISIONS.items() if spec.cpu_twin is None)


if __name__ == "__main__":  # for shell scripts: one name per line
    twins = tuple(f"{p} {spec.cpu_twin}" for p, spec in PRECISIONS.items() if spec.cpu_twin)
    tables = {"precisions": tuple(PRECISIONS), "cpu-precisions": cpu_precisions(), "cpu-twins": twins,
              "solvers": SOLVERS}
    if len(sys.argv) != 2 or sys.argv[1] not in tables:
        print(f"usage: python3 choices.py {{{','.join(tables)}}}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(tables[sys.argv[1]]))
