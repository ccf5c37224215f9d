"""Process-level settings: the CPU thread count a run uses, and what makes small-tensor
CPU work fast. Entry points (cnf.py, bench.py) call ``configure`` once; library modules
never do.

- Threads. torch's own default, one thread per core, collapses as soon as other work
  shares the machine: its OpenMP threads spin waiting for a sibling that lost its core
  (measured 4-8x slower per iteration than one thread with two other busy processes on
  a 2-core machine; docs/benchmarks.md). A run therefore takes one thread per core that
  was idle when it started (``default_threads``), unless ``--threads`` or
  ``OMP_NUM_THREADS`` says otherwise; a resume takes the count its checkpoint recorded
  (``choose_threads``), since torch's reductions, and so the run's bits, depend on it.
- glibc's malloc returns freed blocks of a few hundred KB to the OS and
  page-faults them back on the next allocation: with the solver's [n, w]
  temporaries that was ~500 page faults per field evaluation, more than the
  arithmetic itself. Raising the mmap and trim thresholds keeps them in the heap.
- Denormal floats (from s(1-s) products near saturation) are slow on x86;
  flushing them to zero changes nothing measurable in float32 training.

- Stop signals. SIGTERM, SIGINT and SIGUSR1 are requests a run answers at its next safe
  point (``StopSignals``), from the first line of ``cnf.py`` on: a handler installed only
  once set-up is done leaves a window in which a signal is lost, not merely early. A
  process started as a background job of a non-interactive shell inherits SIGINT ignored,
  and Python then installs no KeyboardInterrupt for it: a Ctrl-C (or a test's SIGINT)
  during the imports did nothing, and the run trained on for hours.

- Machine speed. ``speed_probe`` times one 1024x128 by 128x128 float32 matmul on one
  thread (GFLOP/s): the figure the README's times stand beside, printed by
  ``python bench.py --probe`` and by ``.ci/run`` before its tests. 2-core machines that
  all call themselves the same differ 8-9x in it, and the kit's times follow it.

The thread choice and the signals need no torch; ``configure`` and ``speed_probe`` import it.
"""
import ctypes
import math
import os
import signal
import statistics
import sys
import time

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
IDLE_WINDOW = 0.25  # seconds over which default_threads watches the cores
IDLE_SHARE = 0.8  # a core counts as idle when it was idle this share of the window (or more)


def usable_cores():
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota
    (a container or a SLURM allocation limited to N CPUs)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def core_times(stat_text):
    """{core: (all ticks, idle ticks)} from the per-core lines of /proc/stat's text; idle is
    the idle and iowait columns (the 4th and 5th), all sums the first eight."""
    out = {}
    for line in stat_text.splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *ticks = line.split()
            ticks = [int(t) for t in ticks[:8]]  # user nice system idle iowait irq softirq steal
            out[int(name[3:])] = (sum(ticks), ticks[3] + ticks[4])
    return out


def idle_between(before, after, cores):
    """The idle cores among ``cores`` between two ``core_times``: the sum of their idle shares
    (a core without a tick in between counts as idle)."""
    total = 0.0
    for core in cores:
        if core in before and core in after:
            ticks = after[core][0] - before[core][0]
            total += (after[core][1] - before[core][1]) / ticks if ticks > 0 else 1.0
    return total


def idle_cores(window=IDLE_WINDOW):
    """How many of this process's cores were idle over the next ``window`` seconds (the sum
    of their idle shares), or None where /proc/stat cannot be read (not Linux). The process
    sleeps meanwhile, so only other work counts as busy."""
    try:
        with open("/proc/stat") as f:
            before = core_times(f.read())
        time.sleep(window)
        with open("/proc/stat") as f:
            after = core_times(f.read())
    except (OSError, ValueError, IndexError):
        return None
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(before)
    return idle_between(before, after, mine)


def default_threads():
    """(count, how it was chosen) when nothing sets the count: one thread per core that was
    idle (IDLE_SHARE of the window) as the run started, at least 1 and at most the usable
    cores; one per usable core where the load cannot be read."""
    cores = usable_cores()
    idle = idle_cores()
    if idle is None:
        return cores, f"one per core ({cores})"
    n = max(1, min(cores, int(idle + 1 - IDLE_SHARE)))
    return n, f"one per idle core at the start: {idle:.1f} of {cores} idle"


def choose_threads(requested=None, previous=None, env=None):
    """(count, how it was chosen, note or '') of a run. ``requested`` (--threads) wins; then
    ``previous``, the count a resumed run's checkpoint recorded, capped at the usable cores;
    then OMP_NUM_THREADS; then ``default_threads``. The note says when a resume will not
    continue bit for bit (another count than its previous segment's)."""
    env = os.environ if env is None else env
    if requested is not None:
        n, how = requested, "--threads"
    elif previous is not None:
        cores = usable_cores()
        n, how = min(int(previous), cores), "the checkpoint's"
        if n != int(previous):
            how += f", capped at this machine's {cores} core(s)"
    elif env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        n, how = int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        n, how = default_threads()
    note = ""
    if previous is not None and n != int(previous):
        note = (f"this segment runs {n} thread(s) where the run's previous segment ran {int(previous)}: torch's "
                f"reductions depend on the count, so it will not continue bit for bit")
    return n, how, note


def configure(threads=None):
    """Apply the settings; ``threads`` (a positive int) sets torch's intra-op
    thread count, None keeps torch's default. Returns a short description for the log."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    done = [f"{torch.get_num_threads()} thread(s)"]
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            if libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20):
                done.append("glibc malloc thresholds raised")
        except OSError:  # not glibc (e.g. musl): leave the allocator alone
            pass
    if torch.set_flush_denormal(True):
        done.append("denormals flushed")
    return ", ".join(done)


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 as stop requests, whatever the process inherited (an
    ignored SIGINT included): ``received`` names the first one, and the run stops at its
    next safe point.

    ``exit_line`` and ``exit_code``: until the run has anything to keep (imports, parsing), a
    signal ends the process at once with that line on stderr and that code; a slow import is
    not waited for, and no library's ``except:`` can swallow it. Used as a context: inside, a nested
    ``StopSignals`` takes over (its handlers go in first, then it takes the outer one's
    request, so none falls between the two), and on leaving it puts the outer ones back."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
    _active = []  # the installed instances, innermost last

    def __init__(self, exit_line=None, exit_code=None):
        self.received = None
        self.exit_line, self.exit_code = exit_line, exit_code
        self._old = {}

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
        if self.exit_line is not None:
            os.write(2, (self.exit_line + "\n").encode())
            os._exit(self.exit_code)

    def __enter__(self):
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old[sig] = signal.signal(sig, self._handle)
        if self._active and self.received is None:
            self.received = self._active[-1].received
        self._active.append(self)
        return self

    def install(self):
        """``__enter__`` for a process's lifetime: the start of an entry point."""
        return self.__enter__()

    def __exit__(self, *exc):
        self._active.remove(self)
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# --- the machine's speed ---------------------------------------------------------------------
PROBE_SHAPE = (1024, 128, 128)  # [n, k] @ [k, m]: the standard batch and width's hidden matmul


def speed_probe(reps=300):
    """{"gflops", "ms", "reps"}: one ``PROBE_SHAPE`` float32 matmul on one CPU thread, the
    median of ``reps`` timed calls after a warm-up (the median, not the best: on a shared
    machine it is what a run gets). The caller's thread count is restored."""
    import torch

    n, k, m = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, k, generator=g), torch.randn(k, m, generator=g)
    out = torch.empty(n, m)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(20):
            torch.mm(a, b, out=out)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    ms = statistics.median(times) * 1e3
    return {"gflops": 2 * n * k * m / ms / 1e6, "ms": ms, "reps": reps}


def probe_line(p):
    """The one line that says how fast this machine is (``speed_probe``'s result ``p``)."""
    n, k, m = PROBE_SHAPE
    return (f"machine speed: {p['gflops']:.1f} GFLOP/s (one {n}x{k} @ {k}x{m} float32 matmul on 1 CPU thread, "
            f"median of {p['reps']}: {p['ms']:.3f} ms)")

