"""A Python interpreter for the tests' subprocesses that starts with torch and the kit already loaded.

Most of a tiny test run's time is start-up: ``import torch``, matplotlib, pandas, scipy (through
torchdiffeq), and ``torch._dynamo``, which every ``torch.optim`` step imports. A test suite that
starts a few hundred processes paid it a few hundred times. Here a server loads all that once per
test worker; each subprocess a test starts is then forked from it, and runs the real script, as
``__main__``, in a process of its own.

- ``python tests/warm_python.py serve SOCKET`` loads the modules and serves forks on SOCKET.
- The client is what the tests call ``sys.executable`` (``tests/conftest.py`` writes it): a script
  that hands its argv, environment, working folder and stdin/stdout/stderr to the server, relays
  the stop signals it receives to its fork, and exits the way the fork did (its exit code, or the
  same signal).

A fork is not a cold start, so the client runs the real interpreter (exec) instead whenever that
could differ: flags other than ``-u``, ``-c``, ``-m`` (``-X importtime`` among them), a script
outside the kit, ``tests/slow_start.py imports`` (it slows down cnf.py's ``import torch``, which a fork
has done already; its later phases run warm), or an environment variable read
when a library loads (OpenMP's, Triton's, CUDA's, Python's own) set differently from the server's.
OMP_NUM_THREADS is the exception: a fork given another count, up to the cores, sets torch's to it. A
signal the client inherited as ignored (SIGINT in a shell's background job) starts ignored in the
fork too, as it would in a real process. ``KIT_TEST_COLD=1`` turns the whole thing off.
"""
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOCKET_VAR = "KIT_WARM_SOCKET"
LOADING_VAR = "KIT_WARM_SERVER_PID"  # while this process lives and the socket is not there yet, it is loading
WAIT_FOR_LOAD = 300  # seconds a client waits for a loading server (a cold start meanwhile would compete with it)
REAL_VAR = "KIT_REAL_PYTHON"
# read when a library loads (OpenMP, MKL, Triton's interpreter, CUDA, Python itself), so a fork would keep the server's
LOAD_TIME_VARS = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "TRITON_", "CUDA_", "PYTHON", "TORCH", "LD_", "MALLOC_",
                  "MPLBACKEND", "NUMEXPR_")
UNREAD_VAR = "KIT_WARM_UNREAD"  # the server's list of prefixes that nothing it loaded reads (see serve)
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGQUIT,
           signal.SIGCONT)
# scripts that need a process which has not imported torch yet, when their first argument is one of these
COLD_SCRIPTS = {os.path.join(ROOT, "tests", "slow_start.py"): ("imports",)}


# torch sets the first to its default when torch._inductor loads; Python reads PYTHONPATH, PYTHONHOME, ...,
# never PYTHON itself (tools/gpu_check.sh's interpreter)
NOT_READ = ("TORCHINDUCTOR_CACHE_DIR", "PYTHON")
# A thread count here, from 1 to the usable cores, is what torch's thread count starts at; a fork sets it
# (torch.set_num_threads does what loading with it does), so a run given another count starts warm. Unset,
# not a count, or more than the cores (torch then caps its count at the cores when it loads): cold.
SET_IN_FORK = "OMP_NUM_THREADS"


def _fork_threads(env):
    """The thread count a fork sets from ``env``'s OMP_NUM_THREADS (1 to the usable cores), else None."""
    n = env.get(SET_IN_FORK, "")
    return int(n) if n.isdigit() and 0 < int(n) <= len(os.sched_getaffinity(0)) else None


def _load_time_env(env, unread=()):
    out = {k: v for k, v in env.items() if k.startswith(LOAD_TIME_VARS) and k not in NOT_READ
           and not k.startswith(tuple(unread))}
    if _fork_threads(out) is not None:
        out[SET_IN_FORK] = "a count"
    return out


def _send(conn, obj):
    data = json.dumps(obj).encode()
    conn.sendall(struct.pack("!I", len(data)) + data)


def _recv(conn):
    head = _recv_exactly(conn, 4)
    if head is None:
        return None
    body = _recv_exactly(conn, struct.unpack("!I", head)[0])
    return None if body is None else json.loads(body)


def _recv_exactly(conn, n):
    buf = b""
    while len(buf) < n:
        try:
            chunk = conn.recv(n - len(buf))
        except InterruptedError:
            continue
        if not chunk:
            return None
        buf += chunk
    return buf


def start(real, folder, preload=None):
    """Start a server in ``folder`` (short: a socket path must be) with the interpreter ``real``, and write
    its client there: (the client's path, the environment variables the client reads, the server).
    ``preload``: the modules it loads, if not PRELOAD."""
    sock, client_path = os.path.join(folder, "s"), os.path.join(folder, "python")
    with open(client_path, "w") as f:
        f.write(f"#!{real} -SE\nimport sys\nsys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
                "import warm_python\nwarm_python.client(sys.argv[1:])\n")
    os.chmod(client_path, 0o755)
    import subprocess

    with open(os.path.join(folder, "server.log"), "w") as log:
        server = subprocess.Popen([real, os.path.abspath(__file__), "serve", sock, *(preload or ())],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return client_path, {REAL_VAR: real, SOCKET_VAR: sock, LOADING_VAR: str(server.pid)}, server


def _loading(pid):
    """Whether the server ``pid`` is still alive (not a zombie), so its socket is yet to come."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, ValueError, IndexError):
        return False


# --- the client: what a test runs as sys.executable ------------------------------------------------------
def _warm_request(argv):
    """(mode, target, rest, unbuffered) when argv can run in a fork, else None."""
    unbuffered, i = False, 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-", "-c", "-m"):
        if argv[i] != "-u":
            return None
        unbuffered, i = True, i + 1
    if i >= len(argv) or argv[i] == "-":
        return None
    if argv[i] in ("-c", "-m"):
        if i + 1 >= len(argv):
            return None
        return argv[i][1], argv[i + 1], argv[i + 2:], unbuffered
    script = os.path.abspath(argv[i])
    first = argv[i + 1] if i + 1 < len(argv) else None
    if not script.startswith(ROOT + os.sep) or not script.endswith(".py") or first in COLD_SCRIPTS.get(script, ()):
        return None
    return "s", script, argv[i + 1:], unbuffered


def client(argv):
    real, path = os.environ.get(REAL_VAR), os.environ.get(SOCKET_VAR)
    request = _warm_request(argv)
    server_env = None
    if request and path:
        deadline = time.monotonic() + WAIT_FOR_LOAD
        while not os.path.exists(path) and time.monotonic() < deadline and _loading(os.environ.get(LOADING_VAR, "")):
            time.sleep(0.05)  # the server appears (renamed into place) only once it listens
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
            server_env = _recv(conn)
        except OSError:
            server_env = None
    unread = [p for p in (server_env or {}).get(UNREAD_VAR, "").split(",") if p]
    mine, theirs = _load_time_env(os.environ, unread), _load_time_env(server_env or {}, unread)
    if server_env is None or theirs != mine:
        if os.environ.get("KIT_WARM_DEBUG") or os.environ.get("KIT_WARM_LOG"):
            why = ("not a kit script or flag" if not request else "no server" if server_env is None else
                   f"load-time variables differ: {set(theirs.items()) ^ set(mine.items())}")
            line = f"warm_python: cold start ({why}): {argv}"
            if os.environ.get("KIT_WARM_DEBUG"):
                print(line, file=sys.stderr)
            if os.environ.get("KIT_WARM_LOG"):  # a file the whole test run appends to, one line each
                with open(os.environ["KIT_WARM_LOG"], "a") as f:
                    f.write(line[:1000] + "\n")
        os.execv(real or sys.executable, [real or sys.executable, *argv])  # a cold start
    ignored = [s for s in RELAYED if signal.getsignal(s) == signal.SIG_IGN]
    pending, child = [], []

    def relay(signum, _frame):
        if child:
            os.kill(child[0], signum)
        else:
            pending.append(signum)

    for s in RELAYED:
        signal.signal(s, relay)
    mode, target, rest, unbuffered = request
    data = json.dumps({"mode": mode, "target": target, "argv": rest, "unbuffered": unbuffered, "cwd": os.getcwd(),
                       "env": dict(os.environ), "ignored": [int(s) for s in ignored],
                       "executable": os.path.abspath(sys.argv[0])}).encode()
    socket.send_fds(conn, [struct.pack("!I", len(data)) + data], [0, 1, 2])
    child.append(_recv(conn)["pid"])
    for s in pending:
        os.kill(child[0], s)
    end = _recv(conn)
    if end is None:  # the server went away: as if the process had been killed
        os._exit(137)
    if "signal" in end:
        for s in RELAYED:
            signal.signal(s, signal.SIG_DFL)
        if end["signal"] not in (signal.SIGKILL, signal.SIGSTOP):  # (those two cannot be caught, nor reset)
            signal.signal(end["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), end["signal"])
        os._exit(128 + end["signal"])
    os._exit(end["code"])


# --- the server -------------------------------------------------------------------------------------------
PRELOAD = ("torch", "torch._dynamo", "numpy", "pandas", "matplotlib", "scipy.integrate", "torchdiffeq", "cnf",
           "summarize", "metrics", "plots", "density", "flow", "trainer", "sweep_status", "tables", "cnf_kernels")
OPTIONAL = ("cnf_kernels",)  # triton is optional


def _warm_matplotlib():
    """Draw one small figure, so that a fork finds matplotlib's lazy set-up done (the font files
    opened, the mathtext parser built). A process's first tiny run with figures took about 0.6 s
    more than its second; through forks under load the gain measured about 0.3 s, within the noise.
    Only caches change: the figure is not pyplot's, and no setting is touched."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2), dpi=50)
    FigureCanvasAgg(fig)
    a = fig.add_subplot()
    a.plot([0.0, 1.0], [0.0, 1e-2], "o-", label="x")
    a.set_yscale("symlog", linthresh=1e-3)
    a.set(xlabel="iteration", ylabel="MMD$^2$", title="t")
    a.legend(fontsize=7)
    a.imshow([[0.0, 1.0], [1.0, 0.0]])
    fig.tight_layout()
    for fmt in ("png", "jpg"):
        fig.savefig(io.BytesIO(), format=fmt)


def serve(path, preload=PRELOAD):
    """Load ``preload`` (the tests' servers: PRELOAD; a test of the server itself may load less) and
    serve forks on the socket ``path``."""
    hello = dict(os.environ)  # before the imports, some of which set variables (TORCHINDUCTOR_CACHE_DIR)
    sys.path[0] = ROOT  # as for a script of the kit (not tests/, this file's folder)
    os.chdir(ROOT)
    import importlib

    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:
            if name not in OPTIONAL:
                raise
    if "matplotlib" in preload:
        _warm_matplotlib()
    # the kernels interpreted as in the tests' own process (conftest.py); fast_interpreter from its file,
    # so that tests/ stays off a fork's sys.path
    if "cnf_kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        import importlib.util

        spec = importlib.util.spec_from_file_location("fast_interpreter", os.path.join(ROOT, "tests", "fast_interpreter.py"))
        fast = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fast)
        fast.install()
    import torch

    # Variables for libraries this process never loaded cannot change it: CUDA's with a CPU build of torch
    # (run_cnf.sh gives a CPU cell CUDA_VISIBLE_DEVICES=), Intel OpenMP's (KMP_*, which scikit-learn and
    # joblib set as they are imported, e.g. by a test module) where torch uses GNU OpenMP.
    unread = []
    if torch.version.cuda is None and torch.version.hip is None:
        unread.append("CUDA_")
    try:
        with open("/proc/self/maps") as f:
            if "libiomp" not in f.read():
                unread.append("KMP_")
    except OSError:
        pass
    hello[UNREAD_VAR] = ",".join(unread)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    listener.listen(64)
    os.rename(path + ".new", path)  # a client that sees the path can connect
    print("ready", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    children = {}  # pid -> connection
    parent = os.getppid()
    while os.getppid() == parent:  # a worker killed outright never stops its server: end with it
        for key, _ in sel.select(timeout=0.02):
            try:  # one client's trouble (it died, it sent garbage) never ends the server
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    _send(conn, hello)
                    sel.register(conn, selectors.EVENT_READ, data="new")
                elif key.data == "new":
                    sel.unregister(key.fileobj)
                    _fork(key.fileobj, listener, sel, children)
                else:  # the client hung up (it was killed): take its fork, and that fork's group, with it
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    try:
                        os.killpg(key.data, signal.SIGKILL)
                    except OSError:
                        pass
            except OSError:
                try:
                    key.fileobj.close()
                except OSError:
                    pass
        _reap(sel, children)
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def _fork(conn, listener, sel, children):
    """Read a client's request and fork the process it asked for."""
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    if len(msg) < 4 or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    n = struct.unpack("!I", msg[:4])[0]
    body = msg[4:] + (_recv_exactly(conn, n - len(msg) + 4) or b"")
    pid = os.fork()
    if pid == 0:
        listener.close()
        sel.close()
        for c in children.values():
            c.close()
        conn.close()
        _child(json.loads(body), fds)  # never returns
    for fd in fds:
        os.close(fd)
    children[pid] = conn
    sel.register(conn, selectors.EVENT_READ, data=pid)
    _send(conn, {"pid": pid})


def _reap(sel, children):
    """Tell each client whose fork ended how it ended."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        end = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"code": os.WEXITSTATUS(status)}
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        try:
            _send(conn, end)
        except OSError:
            pass
        conn.close()


def _child(req, fds):
    """Become the process the client asked for, run it, and exit as Python would."""
    import atexit
    import io
    import runpy
    import threading
    import traceback

    code = 0
    try:
        os.setpgid(0, 0)  # its own group, so that killing it takes what it started
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for s in RELAYED + (signal.SIGCHLD,):
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for s in req["ignored"]:  # as inherited by the client: a real process would start with them ignored
            signal.signal(s, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        os.chdir(req["cwd"])
        sys.executable = req["executable"]  # what the script starts (bench.py's workers) starts warm too
        os.environ.clear()
        os.environ.update(req["env"])
        if _fork_threads(os.environ) is not None:  # (a count above the cores is the server's own: torch capped it)
            import torch

            torch.set_num_threads(_fork_threads(os.environ))
        unbuffered = req["unbuffered"] or bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.open(0, "rb", closefd=False), encoding="utf-8")
        sys.stdout = sys.__stdout__ = _stream(1, unbuffered, "strict")
        sys.stderr = sys.__stderr__ = _stream(2, True, "backslashreplace")
        mode, target = req["mode"], req["target"]
        if mode == "s":
            sys.argv = [target, *req["argv"]]
            sys.path[0] = os.path.dirname(target)
            runpy.run_path(target, run_name="__main__")
        elif mode == "m":
            sys.argv = [target, *req["argv"]]
            sys.path[0] = os.getcwd()
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            import types

            sys.argv = ["-c", *req["argv"]]
            sys.path[0] = ""
            main = sys.modules["__main__"] = types.ModuleType("__main__")
            exec(compile(target, "<string>", "exec"), main.__dict__)
    except SystemExit as e:
        code = _exit_code(e.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    _finish()
    os._exit(code)


def _exit_code(value):
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _finish():
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass


def _stream(fd, unbuffered, errors):
    import io

    raw = io.open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)
    return io.TextIOWrapper(raw, encoding="utf-8", errors=errors, line_buffering=unbuffered or os.isatty(fd),
                            write_through=unbuffered)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:  # serve SOCKET [MODULE ...]
        serve(sys.argv[2], tuple(sys.argv[3:]) or PRELOAD)
    else:
        client(sys.argv[1:])
