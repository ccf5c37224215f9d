"""tests/warm_python.py, the interpreter the tests' subprocesses get: a fork behaves as a real process
(exit codes, deaths by signal, relayed stop signals, argv, working folder, environment, stdio), and
whatever a fork could get wrong starts cold."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import warm_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def client():
    """The client of this worker's server (tests/conftest.py: every test's sys.executable) and its
    environment; with warm subprocesses off (KIT_TEST_COLD=1), a server of this module's own. A client
    waits for a server that is still loading."""
    if os.environ.get("KIT_TEST_COLD") != "1" and warm_python.SOCKET_VAR in os.environ:
        yield sys.executable, dict(os.environ)
        return
    folder = tempfile.mkdtemp(prefix="kw")  # a short path: AF_UNIX socket paths are limited
    path, variables, server = warm_python.start(os.environ.get(warm_python.REAL_VAR, sys.executable), folder)
    t0 = time.time()
    while not os.path.exists(variables[warm_python.SOCKET_VAR]):
        assert server.poll() is None and time.time() - t0 < 300, "the server did not start"
        time.sleep(0.1)
    yield path, {**os.environ, **variables}
    server.kill()
    server.wait()
    shutil.rmtree(folder, ignore_errors=True)


def run(client, *argv, env=None, **kw):
    path, base = client
    return subprocess.run([path, *argv], capture_output=True, text=True, env={**base, **(env or {})}, timeout=120, **kw)


def test_a_fork_is_warm_and_reports_as_python_does(client, tmp_path):
    proc = run(client, "-c", "import os, sys; print('torch' in sys.modules, sys.argv, os.getcwd(), os.environ['X']); "
               "print('err', file=sys.stderr); sys.exit(3)", "a", "b", env={"X": "y"}, cwd=tmp_path)
    assert proc.returncode == 3 and proc.stdout == f"True ['-c', 'a', 'b'] {tmp_path} y\n" and proc.stderr == "err\n"
    assert run(client, "-c", "import sys; sys.exit('bad input')").stderr == "bad input\n"
    assert run(client, "-c", "raise SystemExit").returncode == 0
    crash = run(client, "-c", "1 / 0")
    assert crash.returncode == 1 and "ZeroDivisionError" in crash.stderr
    assert run(client, "-c", "import sys; print(sys.stdin.read()[::-1])", input="abc").stdout == "cba\n"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        killed = run(client, "-c", f"import os; os.kill(os.getpid(), {int(sig)})")
        assert killed.returncode == -sig and killed.stderr == "", killed.stderr
    ctrl_c = run(client, "-c", "raise KeyboardInterrupt")
    assert ctrl_c.returncode == -signal.SIGINT and "KeyboardInterrupt" in ctrl_c.stderr
    script = run(client, os.path.join(ROOT, "cnf.py"), "--data", "nope")
    assert script.returncode == 2 and script.stderr.count("\n") == 1 and "nope" in script.stderr


def test_stop_signals_reach_the_fork_and_a_killed_client_takes_it_along(client, tmp_path):
    path, env = client
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: (print('TERM', flush=True), sys.exit(4)))\n"
            "print('up', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([path, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline() == "up\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 4 and proc.stdout.read() == "TERM\n"
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen([path, "-c", f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
                             "print('up', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline() == "up\n"
    fork = int(pidfile.read_text())
    proc.kill()  # SIGKILL cannot be relayed: the server sees the client hang up and kills the fork
    proc.wait()
    t0 = time.time()
    while _alive(fork):
        assert time.time() - t0 < 30, "the fork outlived its killed client"
        time.sleep(0.1)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_an_ignored_sigint_stays_ignored_as_in_a_background_job(client):
    path, env = client
    proc = subprocess.run(["bash", "-c", f"{path} -c 'import signal; print(signal.getsignal(signal.SIGINT) == "
                           "signal.SIG_IGN)' & wait"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout == "True\n", proc.stderr


@pytest.mark.parametrize("argv,env", [(["-X", "importtime", "-c", "pass"], {}), (["-c", "pass"], {"OMP_DYNAMIC": "true"}),
                                      (["-c", "pass"], {"OMP_NUM_THREADS": "0"}),
                                      (["-c", "pass"], {"PYTHONPATH": "/nowhere"})])
def test_what_a_fork_could_get_wrong_starts_cold(client, argv, env):
    """A flag it does not emulate, or a variable that a library reads when it loads, set differently
    from the server's: the real interpreter runs instead (it says why with KIT_WARM_DEBUG=1)."""
    proc = run(client, *argv, env={**env, "KIT_WARM_DEBUG": "1"})
    assert proc.returncode == 0 and "warm_python: cold start" in proc.stderr, proc.stderr
    warm = run(client, "-c", "pass", env={"KIT_WARM_DEBUG": "1"})
    assert warm.returncode == 0 and "cold start" not in warm.stderr


def test_another_thread_count_starts_warm_with_the_count_a_cold_start_has(client):
    """OMP_NUM_THREADS set to another count up to the cores: the fork sets torch's thread count as
    loading torch with it does (a cold start with the same variable is the reference). Above the
    cores, where torch caps the count as it loads, the run starts cold."""
    path, env = client
    code = "import torch; print(torch.get_num_threads())"
    cores = len(os.sched_getaffinity(0))
    for n in sorted({1, cores}):
        warm = run(client, "-c", code, env={"OMP_NUM_THREADS": str(n), "KIT_WARM_DEBUG": "1"})
        assert warm.returncode == 0 and "cold start" not in warm.stderr, warm.stderr
        cold = subprocess.run([env[warm_python.REAL_VAR], "-c", code], capture_output=True, text=True, timeout=300,
                              env={**env, "OMP_NUM_THREADS": str(n)})
        assert warm.stdout == cold.stdout == f"{n}\n", (warm.stdout, cold.stdout, cold.stderr)
    above = run(client, "-c", code, env={"OMP_NUM_THREADS": str(cores + 1), "KIT_WARM_DEBUG": "1"})
    assert "cold start" in above.stderr and above.stdout == f"{cores}\n", above.stderr


def test_variables_of_libraries_never_loaded_do_not_force_a_cold_start(client):
    """KMP_* (Intel OpenMP's, set by scikit-learn and joblib when imported) matter only where torch
    loaded Intel OpenMP; CUDA_* only with a CUDA build of torch."""
    maps = open("/proc/self/maps").read()  # this process has loaded what the server loads
    for var, used in (("KMP_INIT_AT_FORK", "libiomp" in maps),
                      ("CUDA_VISIBLE_DEVICES", torch.version.cuda is not None or torch.version.hip is not None)):
        proc = run(client, "-c", "pass", env={var: "x", "KIT_WARM_DEBUG": "1"})
        assert proc.returncode == 0 and ("cold start" in proc.stderr) == used, (var, proc.stderr)


def test_the_test_runs_own_subprocesses_start_warm():
    """The interpreter every test gets (sys.executable, the client of this worker's server) forks a kit
    script in the environment the tests have after collection (every test module imported): nothing
    that a module sets as it is imported (scikit-learn's KMP_* did) may send them all cold, and one
    started while the server is still loading waits for it."""
    if os.environ.get("KIT_TEST_COLD") == "1" or warm_python.SOCKET_VAR not in os.environ:
        pytest.skip("warm subprocesses are off (KIT_TEST_COLD=1, or xdist's controller)")
    import sklearn  # noqa: F401  (as tests/test_toy_data.py does; sets KMP_* in this process's environment)

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "choices.py"), "precisions"], capture_output=True,
                          text=True, env={**os.environ, "KIT_WARM_DEBUG": "1"}, timeout=120)
    assert proc.returncode == 0 and "cold start" not in proc.stderr, proc.stderr


def test_a_server_loaded_with_more_threads_than_cores_keeps_torchs_capped_count(monkeypatch):
    """pytest run with OMP_NUM_THREADS above the cores: torch capped the server's count as it loaded,
    and a fork with the same variable keeps that count, as a cold start has it. (The server loads torch
    alone: the count is torch's.)"""
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores + 1))
    folder = tempfile.mkdtemp(prefix="kw")
    path, variables, server = warm_python.start(os.environ.get(warm_python.REAL_VAR, sys.executable), folder,
                                                preload=("torch",))
    try:
        proc = run((path, {**os.environ, **variables}), "-c", "import torch; print(torch.get_num_threads())",
                   env={"KIT_WARM_DEBUG": "1"})
        assert "cold start" not in proc.stderr and proc.stdout == f"{cores}\n", (proc.stdout, proc.stderr)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_server_whose_worker_is_killed_outright_ends_and_takes_its_forks_along(client, tmp_path):
    """A test worker killed with SIGKILL never stops its server (pytest_unconfigure does not run): the
    server must notice that its parent is gone, kill the forks still running and exit, rather than
    hold a loaded interpreter for ever. The server here loads nothing (an empty PRELOAD), to be quick."""
    sock = str(tmp_path / "s")
    serve = (f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); import warm_python; "
             f"warm_python.serve({sock!r}, preload=())")
    real = os.environ.get(warm_python.REAL_VAR, sys.executable)
    parent = subprocess.Popen([real, "-c", f"import subprocess, sys, time; p = subprocess.Popen([{real!r}, '-c', "
                               f"{serve!r}]); print(p.pid, flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)
    server = int(parent.stdout.readline())
    try:
        _end_with_parent(client, parent, server, sock, tmp_path)
    finally:  # whatever failed, leave nothing running
        parent.kill()
        for pid in (server, (tmp_path / "pid").read_text() if (tmp_path / "pid").exists() else ""):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass


def _end_with_parent(client, parent, server, sock, tmp_path):
    """Fork one process from ``server``, kill the server's parent, and wait for both to end."""
    t0 = time.time()
    while not os.path.exists(sock):
        assert _alive(server) and time.time() - t0 < 120, "the server did not start"
        time.sleep(0.1)
    pidfile = tmp_path / "pid"
    fork = subprocess.Popen([client[0], "-c", f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
                             "print('up', flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True,
                            env={**client[1], warm_python.SOCKET_VAR: sock, "KIT_WARM_DEBUG": "1"})
    assert fork.stdout.readline() == "up\n"
    forked = int(pidfile.read_text())
    assert _alive(server) and _alive(forked)
    parent.kill()
    parent.wait()
    t0 = time.time()
    while _alive(server) or _alive(forked):
        assert time.time() - t0 < 30, "the server or its fork outlived the server's parent"
        time.sleep(0.1)
    fork.wait(timeout=60)
