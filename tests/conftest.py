"""Tests import the top-level scripts' shared module and never touch the network."""
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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
    """A stage script (its name starts with a digit) imported as a module."""
    from lib import utils as U
    return U.load_script(script)


class Zygote:
    """This test process's tests/zygote.py: stage commands forked from one that has imported
    torch, diffusers and transformers (7 s of each tiny stage run otherwise)."""

    # variables read when used, not at import: pytest's, and two that tokenizers and torch's
    # compiler set in this process once a test has used them
    READ_AT_USE = {"PYTEST_CURRENT_TEST", "TOKENIZERS_PARALLELISM", "TORCHINDUCTOR_CACHE_DIR"}

    def __init__(self, env: dict):
        self.env = env
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "zygote.py")], cwd=ROOT,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.logs = Path(tempfile.mkdtemp(prefix="zygote-"))
        atexit.register(self.close)

    def serves(self, env: dict) -> bool:
        """Whether `env` is the one the libraries were imported under, but for READ_AT_USE."""
        def same(e):
            return {k: v for k, v in e.items() if k not in self.READ_AT_USE}
        return self.proc.poll() is None and same(env) == same(self.env)

    def run(self, argv: list[str], env: dict) -> subprocess.CompletedProcess:
        out, err = self.logs / "stdout", self.logs / "stderr"
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(ROOT), "env": env,
                                          "stdout": str(out), "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.proc.stdout.readline())["rc"]
        return subprocess.CompletedProcess([sys.executable, *argv], rc, out.read_text(), err.read_text())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        shutil.rmtree(self.logs, True)


_ZYGOTE: list[Zygote] = []


def stage(script, run, *extra, check=True, env=None):
    """`python SCRIPT --tiny --run RUN ...` from the repository root, offline; SCRIPT may name a
    system's command too ("-m systems.psa train"); `env`: the whole environment, instead of this one's.
    Forked from the zygote when `env` is the one it started with, else a fresh interpreter."""
    argv = [*script.split(), "--tiny", "--run", str(run), *extra]
    suite = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env = suite if env is None else {**env, "HF_HUB_OFFLINE": "1"}
    if not _ZYGOTE:
        _ZYGOTE.append(Zygote(suite))
    if _ZYGOTE[0].serves(env):
        r = _ZYGOTE[0].run(argv, env)
    else:
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=env)
    if check:
        assert r.returncode == 0, f"{script} failed:\n{r.stderr[-3000:]}"
    return r


_WORLDS: dict[tuple, Path] = {}  # stage-0 flags -> the run folder this process built with them


def tiny_world(run, *flags):
    """Stage 0 at --tiny with `flags` into RUN, trained once per test process for each set of
    flags and copied after that: a copied run folder is the same run (utils.save_config), and
    stage 0 is the longest part of most fixtures."""
    if flags not in _WORLDS:
        built = Path(tempfile.mkdtemp(prefix="tiny-world-"))
        atexit.register(shutil.rmtree, built, True)
        stage("00_toy_world.py", built / "run", *flags)
        _WORLDS[flags] = built / "run"
    shutil.copytree(_WORLDS[flags], run, dirs_exist_ok=True)
    return run


def tiny_world_with_scm(run):
    """Stage 0 at --tiny (4 evaluation prompts per set), the prompt stage, and a random SCM
    saved as stage 2 saves one: the paths that need no trained SCM start here."""
    import torch
    from lib import scorers as S
    tiny_world(run, "--eval-per-set", "4")
    stage("00_curate_prompts.py", run)
    torch.manual_seed(0)
    S.save_scm(S.SafetyCostModel("toy-ViT-tiny", hidden=16), run / "scm", mu_safe=-1.0)
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


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random-weight CLIP (and its processor, CLIP's tokenizer) saved as transformers saves
    one: PickScore, CLIPScore and Q16 load it as they load the real checkpoints."""
    import torch
    from lib import models as M
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=M.clip_tokenizer()).save_pretrained(folder)
    return folder


class Scripted:
    """A chat-completions server on 127.0.0.1 for the judge's tests: each POST is answered by
    `respond(request json) -> (status, body)` when given, else from a queue of (status, body,
    delay); every request is recorded."""

    def __init__(self, respond=None):
        import json
        import time
        from collections import deque
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        self.replies, self.requests, self.respond = deque(), [], respond
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append({"path": self.path, "headers": dict(self.headers), "json": body})
                status, text, delay = (*owner.respond(body), 0.0) if owner.respond else owner.replies.popleft()
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(text.encode())
                except OSError:  # the client timed out and hung up
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def queue(self, status, body, delay=0.0):
        self.replies.append((status, body, delay))


@pytest.fixture
def scripted_server(monkeypatch):
    """Start a Scripted server (its respond set later by the test, or replies queued)."""
    import threading
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    s = Scripted()
    thread = threading.Thread(target=s.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield s
    s.server.shutdown()
    s.server.server_close()
