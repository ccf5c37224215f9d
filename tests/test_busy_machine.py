"""A real, busy machine: competing jobs, a full disk, Ctrl-C, typos and misused commands.

- threads: a resume takes its checkpoint's count unless --threads is given, and continues bit
  for bit however the machine's default would choose;
- a full disk is an outcome: real small filesystems (tmpfs, mounted as root, as in CI; without
  root these skip, and REQUIRE_TMPFS=1 turns the skip into a failure);
- Ctrl-C at any moment, bad flags before torch loads, plots.py --compare misused, and local
  CPU sweeps without tfloat32. (Summaries over fewer than three seeds marked indicative:
  tests/test_summary_stats.py.)
"""
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import imageio.v2 as imageio
import pandas as pd
import pytest

import experiment as ex
from test_cnf import TINY, run_dirs, run_subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # a tiny or small run: seconds on a fast 2-core machine, about a minute on a slow one
# a run small enough for a tmpfs of a few hundred KB: its checkpoint is ~18 KB, its sources ~200 KB
SMALL = [*TINY, "--niters", "40", "--test_freq", "10", "--ckpt_freq", "20", "--threads", "1"]


@contextlib.contextmanager
def tmpfs(path, size):
    """A real filesystem of ``size`` (e.g. '260k') mounted at ``path`` while the block runs."""
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        if os.environ.get("REQUIRE_TMPFS") == "1":
            pytest.fail(f"REQUIRE_TMPFS=1 but no tmpfs can be mounted here: {proc.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def grow(path, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def leftovers(folder):
    return [os.path.join(d, f) for d, dirs, fs in os.walk(folder) for f in fs + dirs if ".tmp" in f]


def error_lines(stderr, prog="cnf.py"):
    """The program's own lines on stderr (tqdm's progress bar also writes there)."""
    return [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.startswith(f"{prog}:")]


def rows_without_timing(folder):
    return pd.read_csv(ex.RunDir(folder).csv).drop(columns=list(ex.TIMING_COLUMNS))


# --- threads ---------------------------------------------------------------------------------------
def test_a_resume_keeps_the_checkpoints_thread_count_and_continues_bit_for_bit(tmp_path):
    """2 iterations with --threads 1, resumed to 4 without --threads, give the CSV rows of the
    uninterrupted 4-iteration run (timing columns aside), at the default batch and width, even
    with OMP_NUM_THREADS=2 in the resume's environment; a resume given --threads 2 does not (so
    the count matters here and the first comparison can fail)."""
    common = ["--num_timesteps", "8", "--test_freq", "2", "--num_samples_val", "256", "--num_samples_test", "256",
              "--no-figures"]
    env1 = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    # (--threads wins over OMP_NUM_THREADS, so the runs given it keep the tests' 1: they start warm)
    full = run_subprocess(*common, "--niters", "4", "--threads", "1", "--results_dir", str(tmp_path / "full"),
                          timeout=TIMEOUT)
    assert full.returncode == 0, full.stderr[-2000:]
    part = run_subprocess(*common, "--niters", "2", "--threads", "1", "--results_dir", str(tmp_path / "part"),
                          timeout=TIMEOUT)
    assert part.returncode == 0, part.stderr[-2000:]
    (first,) = run_dirs(tmp_path / "part")
    for name, resume_flags, env in (("kept", [], {**env1, "OMP_NUM_THREADS": "2"}), ("kept_no_env", [], env1),
                                    ("changed", ["--threads", "2"], os.environ)):
        folder = str(tmp_path / name / os.path.basename(first))  # the same 2 iterations, resumed three ways
        shutil.copytree(first, folder)
        proc = run_subprocess("--resume", folder, "--niters", "4", *resume_flags, env=env, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        same = rows_without_timing(folder).equals(rows_without_timing(run_dirs(tmp_path / "full")[0]))
        log = open(ex.RunDir(folder).log).read()
        if name == "changed":
            assert not same and log.count("will not continue bit for bit") == 1
        else:
            assert same and "threads 1 (the checkpoint's)" in log and "bit for bit" not in log


def test_thread_choice_order_and_cap(monkeypatch):
    """--threads, then the checkpoint's count (capped at the usable cores), then OMP_NUM_THREADS,
    then one per idle core."""
    import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    monkeypatch.setattr(runtime, "idle_cores", lambda window=0: 1.1)
    assert runtime.choose_threads(3, previous=1, env={"OMP_NUM_THREADS": "4"})[:2] == (3, "--threads")
    n, how, note = runtime.choose_threads(None, previous=1, env={"OMP_NUM_THREADS": "4"})
    assert (n, how, note) == (1, "the checkpoint's", "")
    n, how, note = runtime.choose_threads(None, previous=8, env={})
    assert n == 2 and "capped at this machine's 2" in how and "not continue bit for bit" in note
    assert runtime.choose_threads(None, env={"OMP_NUM_THREADS": "4"})[:2] == (4, "OMP_NUM_THREADS")
    assert runtime.choose_threads(None, env={})[0] == 1  # 1.1 idle cores: one thread
    monkeypatch.setattr(runtime, "idle_cores", lambda window=0: 1.85)
    assert runtime.choose_threads(None, env={})[0] == 2
    monkeypatch.setattr(runtime, "idle_cores", lambda window=0: 0.05)
    assert runtime.choose_threads(None, env={})[0] == 1  # at least one
    monkeypatch.setattr(runtime, "idle_cores", lambda window=0: None)
    assert runtime.choose_threads(None, env={})[0] == 2  # no /proc/stat: one per core


def test_idle_cores_from_proc_stat():
    """The idle count reads /proc/stat's idle and iowait columns per core: core 0 idle for 90 of
    100 ticks, core 1 for 5 of 100 (busy with user and system time), core 2 not ours."""
    import runtime

    before = runtime.core_times("cpu  1 2 3 4 5 6 7 8 0 0\n"
                                "cpu0 100 0 50 1000 10 0 0 0 0 0\ncpu1 500 5 100 20 0 0 0 0 0 0\n"
                                "cpu2 0 0 0 0 0 0 0 0 0 0\nintr 12345\n")
    after = runtime.core_times("cpu  9 9 9 9 9 9 9 9 0 0\n"
                               "cpu0 105 0 55 1080 20 0 0 0 0 0\ncpu1 580 5 115 25 0 0 0 0 0 0\n"
                               "cpu2 0 0 0 500 0 0 0 0 0 0\n")
    assert before[0] == (1160, 1010) and before[1] == (625, 20)
    assert runtime.idle_between(before, after, {0, 1}) == pytest.approx(0.9 + 0.05)
    assert runtime.idle_between(before, after, {0}) == pytest.approx(0.9)


def test_idle_cores_sees_a_busy_core():
    """One more process spinning takes about one core off the idle count."""
    import runtime

    before = runtime.idle_cores(0.5)
    if before is None:
        pytest.skip("no /proc/stat here")
    if before < 0.8:
        pytest.skip(f"the machine is already busy ({before:.1f} idle cores): nothing to take off")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        during = runtime.idle_cores(0.5)
    finally:
        busy.kill()
        busy.wait()
    assert 0.0 <= during <= before - 0.5, (before, during)


# --- a full disk ---------------------------------------------------------------------------------
def test_a_full_disk_during_training_is_one_line_and_resumable(tmp_path):
    """On a 260 KB filesystem the run stops at a checkpoint it cannot write: exit 6, one line
    naming the file and the space the run needs, no traceback, no temporary file, and a
    status.json that says disk_full if there is one (the job log's exit code says it otherwise:
    tests/test_sweep_status.py). Enlarged, --resume completes with the rows of an
    uninterrupted run."""
    with tmpfs(tmp_path / "fs", "260k") as fs:
        proc = run_subprocess(*SMALL, "--no-figures", "--results_dir", str(fs), timeout=TIMEOUT)
        assert proc.returncode == ex.EXIT_DISK_FULL, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        (line,) = error_lines(proc.stderr)
        assert line.startswith("cnf.py: disk full: could not write ") and "No space left on device" in line
        assert "needs about" in line and "MB more to finish" in line and "resume with: python cnf.py --resume" in line
        (folder,) = run_dirs(fs)
        assert not leftovers(folder)
        if os.path.exists(ex.RunDir(folder).status):  # written when the space the failed write freed holds it
            assert json.load(open(ex.RunDir(folder).status))["status"] == "disk_full"
        ex.load_checkpoint(ex.RunDir(folder).ckpt)  # the checkpoint on disk is whole
        grow(fs, "4m")
        proc = run_subprocess("--resume", folder, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.load(open(ex.RunDir(folder).status))["status"] == "completed" and not leftovers(folder)
        resumed = rows_without_timing(folder)
    full = run_subprocess(*SMALL, "--no-figures", "--results_dir", str(tmp_path / "full"), timeout=TIMEOUT)
    assert full.returncode == 0
    pd.testing.assert_frame_equal(resumed, rows_without_timing(run_dirs(tmp_path / "full")[0]))


def test_a_full_disk_before_the_first_checkpoint_leaves_nothing(tmp_path):
    """Nothing trained yet: exit 6, one line that says so, and no run folder left behind."""
    with tmpfs(tmp_path / "fs", "8k") as fs:
        proc = run_subprocess(*SMALL, "--no-figures", "--results_dir", str(fs), timeout=TIMEOUT)
        assert proc.returncode == ex.EXIT_DISK_FULL, proc.stderr[-2000:]
        (line,) = error_lines(proc.stderr)
        assert "nothing was trained" in line and "run the command again" in line and "Traceback" not in proc.stderr
        assert os.listdir(fs) == []


def test_a_full_disk_while_drawing_the_figures_still_completes_the_run(tmp_path):
    """On 1.5 MB with --viz the numbers fit and the GIF does not (11 frames of 5000 samples: about 0.4 MB
    of frames, a 1.3 MB GIF, 0.5 MB of numbers, code and CSV figures): the run is completed, status.json
    names the missing figures, every figure file that exists is whole (no truncated GIF), no
    temporary file is left, exit 6 with one line; `python plots.py RUN` draws them later."""
    with tmpfs(tmp_path / "fs", "1536k") as fs:
        proc = run_subprocess(*SMALL, "--viz_samples", "5000", "--viz_timesteps", "11", "--results_dir", str(fs),
                              timeout=TIMEOUT)
        assert proc.returncode == ex.EXIT_DISK_FULL, proc.stderr[-2000:]
        (line,) = error_lines(proc.stderr)
        assert "disk full while drawing the figures" in line and "the run is completed" in line
        assert "python plots.py" in line and "Traceback" not in proc.stderr
        (folder,) = run_dirs(fs)
        run = ex.RunDir(folder)
        status = json.load(open(run.status))
        assert status["status"] == "completed" and "cnf-viz.gif" in status["missing_figures"]
        assert status["final"]["test_loss"] > 0 and os.path.isfile(run.test_logp) and os.path.isfile(run.file("density.npz"))
        assert not leftovers(folder)
        for name in status["missing_figures"]:
            assert not os.path.exists(run.file(name))
        for frame in glob.glob(run.file("cnf-viz-*.jpg")):
            assert imageio.imread(frame).shape[:2] == imageio.imread(glob.glob(run.file("cnf-viz-*.jpg"))[0]).shape[:2]
        grow(fs, "64m")
        redraw = subprocess.run([sys.executable, os.path.join(ROOT, "plots.py"), folder], capture_output=True,
                                text=True, timeout=TIMEOUT)
        assert redraw.returncode == 0, redraw.stderr
        assert len(imageio.mimread(run.file("cnf-viz.gif"))) == 11
        assert json.load(open(run.status))["missing_figures"] == []


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    """A write that fails, for want of space or because the target is a folder, removes its
    temporary file and leaves the target as it was; a full disk names the file."""
    target = tmp_path / "folder_target"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        ex.atomic_write(target, b"x" * 1000)
    assert not leftovers(tmp_path) and target.is_dir()
    with tmpfs(tmp_path / "fs", "64k") as fs:
        kept = fs / "kept.bin"
        ex.atomic_write(kept, b"old")
        with pytest.raises(ex.DiskFull) as err:
            ex.atomic_write(kept, b"y" * 200_000)
        assert err.value.filename == str(kept) and err.value.needed == 200_000
        assert kept.read_bytes() == b"old" and not leftovers(fs)


def test_summaries_on_a_full_disk_say_what_was_written(tmp_path):
    """summarize.py writes its numbers before its figures; out of space it says which files are
    whole and which were not written, exit 6, and leaves no temporary file."""
    run = run_subprocess(*TINY, "--no-figures", "--results_dir", str(tmp_path / "runs"), timeout=TIMEOUT)
    assert run.returncode == 0
    with tmpfs(tmp_path / "fs", "48k") as fs:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "summarize.py"), str(tmp_path / "runs"), "--out",
                               str(fs)], capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == ex.EXIT_DISK_FULL, proc.stderr[-2000:]
        (line,) = error_lines(proc.stderr, "summarize.py")
        assert "disk full" in line and "written whole: summary.csv" in line and "not written:" in line
        assert "Traceback" not in proc.stderr and not leftovers(fs)


# --- Ctrl-C, typos --------------------------------------------------------------------------------
# A run that exits promptly after a stop signal needs a tiny iteration and a checkpoint, or the
# tiny run's final metrics: a few seconds on a fast machine, well under a minute on one 8x slower.
STOP_TIMEOUT = 120
# (phase, signal, expected exit code, iterations): before the run folder exists 130 and nothing
# written; after it, 4 and a resumable folder (status interrupted, or completed with the figures
# it did not draw listed, for a signal while drawing them).
STOP_CASES = [("imports", "SIGINT", ex.EXIT_CTRL_C, 100000), ("imports", "SIGTERM", ex.EXIT_CTRL_C, 100000),
              ("threads", "SIGINT", ex.EXIT_CTRL_C, 100000), ("setup", "SIGINT", ex.EXIT_INTERRUPTED, 100000),
              ("first_iteration", "SIGTERM", ex.EXIT_INTERRUPTED, 100000),
              ("final_metrics", "SIGINT", ex.EXIT_INTERRUPTED, 4), ("figures", "SIGINT", ex.EXIT_INTERRUPTED, 4)]


def _start_ignoring_sigint():
    # as a background job of a non-interactive shell starts: SIGINT ignored (the case that lost it)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _wait_for_line(stream, marker, timeout):
    """Read ``stream`` (in a thread) until a line equals ``marker``; returns everything read
    then, or None when the line did not come within ``timeout`` seconds."""
    import queue
    import threading

    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in iter(stream.readline, "")] + [lines.put(None)],
                     daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ln = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if ln is None:
            return None
        seen.append(ln)
        if marker in ln.replace("\r", "\n").splitlines():  # after a progress bar's \r, on the same line
            return lines, seen
    return None


@pytest.mark.parametrize("phase,signame,code,niters", STOP_CASES, ids=lambda x: str(x))
def test_a_stop_signal_in_any_phase_is_answered(tmp_path, phase, signame, code, niters):
    """A stop signal at any moment of a run ends it as documented, even in a process that
    inherited SIGINT ignored (a background job of a non-interactive shell: SIGINTs during the
    imports were lost, and the run trained on). Each phase is made slow on purpose
    (tests/slow_start.py) and the signal sent inside it, so the timing is the same on a fast
    machine and a slow one. No traceback; exit 130 with nothing written before the run folder
    exists, exit 4 with a resumable folder after."""
    results = tmp_path / "res"
    cmd = [sys.executable, os.path.join(ROOT, "tests", "slow_start.py"), phase, "3", os.path.join(ROOT, "cnf.py"),
           *TINY, "--niters", str(niters), "--threads", "1", "--results_dir", str(results)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_start_ignoring_sigint)
    try:
        got = _wait_for_line(proc.stderr, f"@@ {phase}", STOP_TIMEOUT)
        assert got is not None, f"cnf.py never reached the {phase} phase within {STOP_TIMEOUT} s"
        lines, seen = got
        proc.send_signal(getattr(signal, signame))
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"cnf.py did not end within {STOP_TIMEOUT} s of a {signame} sent during the {phase} phase: "
                        f"the signal was lost")
        err = "".join(seen)
        while (ln := lines.get(timeout=STOP_TIMEOUT)) is not None:
            err += ln
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert proc.returncode == code, (phase, signame, proc.returncode, err[-3000:])
    if code == ex.EXIT_CTRL_C:
        assert error_lines(err) == ["cnf.py: interrupted before the run started; nothing was written"], err[-3000:]
        assert not results.exists() or not os.listdir(results)
        return
    (folder,) = run_dirs(results)
    status = json.load(open(ex.RunDir(folder).status))
    if phase == "figures":  # trained and measured: completed, with the figures it did not draw listed
        # the figure being drawn is finished, the ones after it are skipped and listed
        assert status["status"] == "completed" and "optimization_stats.png" not in status["missing_figures"]
        assert "cnf-viz.gif" in status["missing_figures"], status
        assert "SIGINT while drawing the figures" in open(ex.RunDir(folder).log).read()
    else:
        assert status["status"] == "interrupted" and signame in status["exit_reason"], status
        assert os.path.isfile(ex.RunDir(folder).ckpt)


ENTRY_POINTS = [
    ("cnf.py", ["--data", "nope"]), ("cnf.py", ["--odeint", "scipy"]), ("cnf.py", ["--precision", "float8"]),
    ("cnf.py", ["--niters", "0"]), ("cnf.py", ["--help"]), ("summarize.py", ["--nope"]), ("summarize.py", ["--help"]),
    ("plots.py", ["--help"]), ("plots.py", ["--compare", "x.png", "/no/such/run"]), ("metrics.py", ["--device", "tpu", "."]),
    ("metrics.py", ["--help"]), ("bench.py", ["--paths", "nope"]), ("bench.py", ["--help"]),
    ("density.py", ["/no/such/run"]), ("density.py", ["--help"]),
]


@pytest.mark.parametrize("script,argv", ENTRY_POINTS, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_bad_flags_and_help_are_answered_before_torch_loads(script, argv):
    """Every entry point checks its flags (and answers --help) before importing torch, so a
    typo is answered in a fraction of the time torch takes to load. Counted, not timed:
    Python's own import log (-X importtime) must not list torch."""
    proc = subprocess.run([sys.executable, "-X", "importtime", script, *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    imported = {ln.split("|")[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    assert "torch" not in imported and "pandas" not in imported, (script, argv)
    if argv == ["--help"]:
        assert proc.returncode == 0 and "usage:" in proc.stdout
    else:
        errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:")]
        assert proc.returncode == 2 and len(errors) == 1 and "error" in errors[0], proc.stderr[-1000:]


# --- sweeps on a CPU ---------------------------------------------------------------------------------
def test_a_local_cpu_sweep_skips_tfloat32(tmp_path):
    """Without a GPU the tfloat32 cells would repeat float32: skipped, with a one-line note, and
    the dry run counts the rest; with a GPU (here: one named by CUDA_VISIBLE_DEVICES) they stay."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "CNF_PYTHON": sys.executable}
    cpu = subprocess.run(["bash", "run_cnf.sh", "--local", "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    assert cpu.returncode == 0, cpu.stderr
    notes = [ln for ln in cpu.stdout.splitlines() if ln.startswith("note:")]
    assert notes == ["note: no GPU here: skipping the tfloat32 cells (on a CPU they compute exactly like another "
                     "precision: tfloat32 as float32)"]
    assert cpu.stdout.splitlines()[-1] == "216 cells (local)" and "tfloat32" not in cpu.stdout.replace(notes[0], "")
    gpu = subprocess.run(["bash", "run_cnf.sh", "--local", "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                         env={**env, "CUDA_VISIBLE_DEVICES": "0"}, timeout=300)
    assert gpu.stdout.splitlines()[-1] == "264 cells (local)" and "note:" not in gpu.stdout
    alone = subprocess.run(["bash", "run_cnf.sh", "--local", "--dry-run", "--precisions", "tfloat32"],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert alone.returncode == 2 and "nothing left to run" in alone.stderr
