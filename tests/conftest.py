"""Test-session setup for tests/.

- Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors;
  that mode is fixed when ``cnf_kernels`` is imported, so it is set here, before
  any test module loads. Subprocesses (cnf.py smoke runs) inherit it.
- One CPU thread per run, unless OMP_NUM_THREADS says otherwise. A run's default
  thread count follows the machine's load at its start (one per idle core), so
  two runs that a test starts side by side and compares bit for bit could choose
  different counts, and with them different roundings. The thread tests
  (tests/test_busy_machine.py, tests/test_cnf.py) remove or set it themselves.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
