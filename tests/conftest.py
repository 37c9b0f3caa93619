"""Tests import the top-level scripts' shared module and never touch the network."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_configure(config):
    # `slow` (tests/test_real_size.py, about 3 minutes): make test and CI leave it out
    # (-m "not slow"); make test-slow runs it
    config.addinivalue_line("markers", "slow: real-size models on the CPU (minutes); make test-slow")


ROOT = Path(__file__).resolve().parents[1]


def module(script):
    """A top-level script (its name starts with a digit) imported as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(script[:-3].replace("0", "m"), ROOT / script)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def stage(script, run, *extra, check=True):
    """`python SCRIPT --tiny --run RUN ...` from the repository root, offline."""
    r = subprocess.run([sys.executable, script, "--tiny", "--run", str(run), *extra], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if check:
        assert r.returncode == 0, f"{script} failed:\n{r.stderr[-3000:]}"
    return r


def tiny_world_with_scm(run):
    """Stage 0 at --tiny (4 evaluation prompts per set) and a random SCM saved as stage 2 saves
    one: the paths that need no trained SCM start here."""
    import torch
    import common as C
    stage("00_toy_world.py", run, "--eval-per-set", "4")
    torch.manual_seed(0)
    C.save_scm(C.SafetyCostModel("toy-ViT-tiny", hidden=16), run / "scm", mu_safe=-1.0)
    return run


def free_port() -> int:
    """A port nobody listens on: test files run side by side (pytest -n), so no fixed ports."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script, run, *extra, nproc=2, env=None):
    """`torchrun --nproc_per_node=N SCRIPT --tiny --run-dir RUN ...` from the repository root."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                        f"--master_port={free_port()}", script, "--tiny", "--run-dir", str(run), *extra],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture
def torchrun():
    return _torchrun
