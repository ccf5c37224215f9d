"""Run cnf.py as ``__main__`` with one phase of its run made slow on purpose, and say on stderr
when that phase begins, so that a test can send its signal inside the phase on any machine:

    python tests/slow_start.py PHASE SECONDS cnf.py [cnf.py flags]

PHASE is one of PHASES: ``imports`` (inside cnf.py's ``import torch``), ``threads`` (the thread
choice, before the run folder exists), ``setup`` (building the trainer, in the new run folder),
``first_iteration``, ``final_metrics`` (the end-of-run test metrics) or ``figures`` (drawing the
CSV figures of a completed run). The phase prints ``@@ PHASE`` on stderr, then sleeps SECONDS
before going on. Nothing of cnf.py is changed: the slow step is a wrapper around the function
that starts the phase (tests/test_busy_machine.py, the stop-signal tests).
"""
import builtins
import functools
import os
import runpy
import sys
import time

PHASES = ("imports", "threads", "setup", "first_iteration", "final_metrics", "figures")


def _mark_then_sleep(phase, seconds):
    sys.stderr.write(f"\n@@ {phase}\n")  # a line of its own, after a progress bar
    sys.stderr.flush()
    time.sleep(seconds)


def _slow_once(owner, name, phase, seconds):
    """Wrap ``owner.name`` so that its first call marks the phase and sleeps first."""
    original = getattr(owner, name)
    done = []

    @functools.wraps(original)
    def slow(*args, **kwargs):
        if not done:
            done.append(True)
            _mark_then_sleep(phase, seconds)
        return original(*args, **kwargs)

    setattr(owner, name, slow)


def main():
    phase, seconds, script = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    if phase not in PHASES:
        sys.exit(f"slow_start.py: unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    sys.argv = [script, *sys.argv[4:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    if phase == "imports":
        real_import = builtins.__import__

        def slow_import(name, *args, **kwargs):
            if name == "torch" and "torch" not in sys.modules:
                builtins.__import__ = real_import
                _mark_then_sleep(phase, seconds)
            return real_import(name, *args, **kwargs)

        builtins.__import__ = slow_import
    else:  # the later phases wrap a function of a module cnf.py imports (loaded here first)
        import plots
        import runtime
        import trainer

        owner, name = {"threads": (runtime, "choose_threads"), "setup": (trainer.Trainer, "__init__"),
                       "first_iteration": (trainer.Trainer, "step"),
                       "final_metrics": (trainer.Trainer, "final_evaluation"),
                       "figures": (plots, "plot_optimization")}[phase]
        _slow_once(owner, name, phase, seconds)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
