"""The tests' stage runner (~90 lines): a process that imports torch, diffusers and
transformers once, then forks a child per stage command, which runs the script as
`python SCRIPT ARGS` would.

Importing those libraries takes about 7 s of a tiny stage run's 10-15 s on 2 CPU cores, and
the suite runs about 200 stage commands. A forked child starts with the imports done and
nothing else shared: the script and its presets are its own, and Python's and NumPy's
unseeded random states are drawn afresh, as in a fresh interpreter. It is not a stage launcher for users, and not a sandbox: conftest.stage() falls
back to a real subprocess whenever the environment differs from the one this process was
started with, since these libraries read variables (OMP_NUM_THREADS, HF_HUB_OFFLINE) at import.

Protocol, one JSON line each way: {"argv", "cwd", "env", "stdout", "stderr"} in, {"rc"} out.
"""
import atexit
import json
import os
import random
import runpy
import sys
import threading
import traceback

import numpy
# the imports are the point: every child inherits them
import torch  # noqa: F401
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401


def exit_code(e: SystemExit) -> int:
    """What the interpreter exits with for SystemExit(code): None is 0, a message is 1."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def child(request: dict) -> None:
    """Runs in the forked process: `python -m MODULE ...` or `python SCRIPT ...`, never returns."""
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    random.seed()  # from the OS's entropy, as at an interpreter's start; the zygote's otherwise
    numpy.random.seed()
    argv, code = request["argv"], 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = request["cwd"]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = exit_code(e)
    except BaseException:  # as the interpreter does: the traceback on stderr, exit status 1
        traceback.print_exc()
        code = 1
    threading._shutdown()  # the interpreter's exit: join the threads, then the atexit functions
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's channel
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing else may write into it
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(request)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    main()
