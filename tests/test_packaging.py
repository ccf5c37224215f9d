"""torchmpnode installs the way its users expect: ``pip install .`` from a clone makes it
importable from any folder, with its own version, and it depends on torch alone."""
import glob
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

import torchmpnode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_project_file_declares_torchmpnode_on_torch_alone():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["name"] == "torchmpnode" and project["project"]["dependencies"] == ["torch"]
    assert project["tool"]["setuptools"]["packages"] == ["torchmpnode"]  # the package, none of the kit's scripts
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "torchmpnode.__version__"}
    assert torchmpnode.__version__.count(".") == 2


def meta_dir(target):
    (meta,) = glob.glob(str(target / "torchmpnode-*.dist-info" / "METADATA"))
    return meta


def test_pip_install_makes_it_importable_from_anywhere(tmp_path):
    """A real install (pip, from a copy of the clone's package files, no network: the build
    backend is this environment's setuptools) into a folder, imported from another folder."""
    try:
        import setuptools
    except ImportError:
        pytest.skip("setuptools is not installed here")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip(f"setuptools {setuptools.__version__} builds wheels only with the wheel package")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), src)
    shutil.copytree(os.path.join(ROOT, "torchmpnode"), src / "torchmpnode",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (src / "docs").mkdir()
    shutil.copy(os.path.join(ROOT, "docs", "solver.md"), src / "docs")
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    installed = sorted(f for f in os.listdir(target / "torchmpnode") if f.endswith(".py"))
    assert installed == sorted(f for f in os.listdir(os.path.join(ROOT, "torchmpnode")) if f.endswith(".py"))
    assert sorted(os.listdir(target)) == sorted(["torchmpnode", os.path.basename(os.path.dirname(meta_dir(target)))])
    meta = meta_dir(target)
    requires = [ln.split(":", 1)[1].strip() for ln in open(meta) if ln.startswith("Requires-Dist:")]
    assert requires == ["torch"], requires
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import torchmpnode, torch; print(torchmpnode.__version__, torchmpnode.__file__); "
            "y = torchmpnode.odeint(lambda t, y: -y, torch.ones(2), torch.linspace(0, 1, 3)); print(float(y[-1, 0]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere,
                         env={**os.environ, "PYTHONPATH": str(target)}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    version, path, value = run.stdout.split()
    assert version == torchmpnode.__version__ and path.startswith(str(target))
    assert abs(float(value) - 0.36787944) < 1e-3  # e^-1 by rk4 on 2 steps
