"""tests/zygote.py, the tests' stage runner: a command forked from it ends as the same command
in a fresh interpreter ends (exit status, message, output), whichever way it exits."""
import os
import subprocess
import sys

import pytest
from conftest import ROOT, _ZYGOTE, Zygote, stage

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def zygote():
    z = Zygote(ENV)
    yield z
    z.close()


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.parametrize("argv, status", [
    (["00_curate_prompts.py", "--tiny", "--no-such-flag"], 2),  # argparse's usage error
    (["05_evaluate.py", "--tiny", "--run", "/nonexistent/run"], 1),  # SystemExit(a message)
    (["-m", "systems.draws", "table", "--help"], 0),  # a system's command: its help on stdout
    (["RAISES"], 1),  # an uncaught exception: its traceback
], ids=["argparse", "message", "module", "traceback"])
def test_a_forked_command_ends_as_a_fresh_interpreter_ends(zygote, tmp_path, argv, status):
    if argv == ["RAISES"]:
        script = tmp_path / "raises.py"
        script.write_text("raise RuntimeError('boom')\n")
        argv = [str(script)]
    forked = zygote.run(argv, ENV)
    fresh = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert forked.returncode == fresh.returncode == status
    assert last_line(forked.stderr) == last_line(fresh.stderr)
    assert forked.stdout == fresh.stdout
    if status == 1 and "raises" in argv[0]:
        assert "Traceback" in forked.stderr and last_line(forked.stderr) == "RuntimeError: boom"


def test_stage_forks_from_the_zygote_and_falls_back_for_another_environment(tmp_path):
    assert stage("00_curate_prompts.py", tmp_path / "run", "--no-such-flag", check=False).returncode == 2
    assert _ZYGOTE[0].serves(ENV)
    other = {**os.environ, "OMP_NUM_THREADS": "3"}  # read by OpenMP when torch is imported
    assert not _ZYGOTE[0].serves({**other, "HF_HUB_OFFLINE": "1"})
    assert stage("00_curate_prompts.py", tmp_path / "run", "--no-such-flag", check=False,
                 env=other).returncode == 2


def test_each_forked_command_draws_its_own_unseeded_random_state(zygote, tmp_path):
    script = tmp_path / "draw.py"
    script.write_text("import random, numpy\nprint(random.random(), numpy.random.rand())\n")
    first, second = (zygote.run([str(script)], ENV).stdout.split() for _ in range(2))
    assert len(first) == 2 and first[0] != second[0] and first[1] != second[1]
