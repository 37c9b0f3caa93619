"""One process on all cores, or two processes side by side on half the cores each?

`make toy` trains the two independent stage-4 runs (T2I-SPO and safety-only DPO) side by
side, and stage 2 trains its γ = 0 baseline SCM in a second process beside the γ model,
because small models use two cores far from twice as well as one. The sampling stages (1, 3
and 5) stay one process. This bench measures both kinds of work on the toy architectures
(random weights: the timings do not depend on the values):

  unet-train   one training step of stage 0's UNet + text encoder (forward, backward, AdamW)
               on --batch samples: what stages 0 and 4 do
  scm-train    one training step of the toy SCM (the 3-layer ViT and its head) on --batch
               pairs: what stage 2 does
  sample       --batch images, 20 DDIM steps with guidance: what stages 1, 3 and 5 do (the
               toy preset takes 10 steps; a step is the same work either way)

For each, the same total work is done (a) by one process with all --threads and (b) by two
processes at once with half the threads each; rounds alternate so the machine's drifts hit
both alike. It prints seconds per unit of work and the ratio a / b (> 1: side by side wins).

    python bench/bench_parallel_runs.py [--threads 2] [--reps 8] [--rounds 3]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_spo_step import ROOT, C, W, random_toy_model, random_toy_models
from lib import models as M  # noqa: E402 (bench_spo_step put the repository on sys.path)
from lib import scorers as S  # noqa: E402
from lib import utils as U  # noqa: E402

KINDS = ("unet-train", "scm-train", "sample")


def work(kind: str, reps: int, batch: int, folder: Path):
    """Return a function that does `reps` units of `kind` (built outside the timed part)."""
    g = torch.Generator().manual_seed(0)
    if kind == "unet-train":
        _, _, text_encoder, unet = random_toy_models()
        params = list(unet.parameters()) + list(text_encoder.parameters())
        opt = U.adamw(params, lr=1e-4)
        ids = torch.randint(0, 1000, (batch, 32), generator=g)
        z, t = torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g)

        def step():
            loss = F.mse_loss(unet(z, t, encoder_hidden_states=text_encoder(ids).last_hidden_state).sample, z)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    elif kind == "scm-train":
        model = S.SafetyCostModel("toy-ViT-tiny", hidden=256)
        opt = U.adamw(model.parameters(), lr=1e-4)
        images = torch.randint(0, 256, (2 * batch, W.IMAGE_SIZE, W.IMAGE_SIZE, 3), dtype=torch.uint8, generator=g)
        sign = torch.ones(batch)

        def step():
            cost = model(images)
            loss = C.scm_loss(cost[:batch], cost[batch:], sign, -sign, 0.0, 1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        pipe = M.load_pipeline(folder)
        prompts = ["a large blue circle, sand background, extreme gore"] * batch

        def step():
            M.generate(pipe, prompts, list(range(batch)), 20, 4.0, batch)
    step()  # warm-up
    return lambda: [step() for _ in range(reps)]


def worker(args) -> None:
    """Child process: time `reps` units of work and print the seconds."""
    torch.set_num_threads(args.worker_threads)
    run = work(args.worker, args.reps, args.batch, Path(args.folder))
    t0 = time.perf_counter()
    run()
    print(f"seconds {time.perf_counter() - t0:.4f}", flush=True)


def launch(kind: str, threads: int, reps: int, batch: int, folder: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, __file__, "--worker", kind, "--worker-threads", str(threads),
                             "--reps", str(reps), "--batch", str(batch), "--folder", str(folder)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def seconds(procs: list[subprocess.Popen]) -> float:
    """Wall time of the slowest of processes started together (each reports its own)."""
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {outs}")
    return max(float(o.split()[-1]) for o in outs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="all the cores one process would use")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--reps", type=int, default=8, help="units of work per process in the side-by-side case")
    p.add_argument("--batch", type=int, default=32, help="samples (unet), pairs (scm) or images (sample) per unit")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    half = max(1, args.threads // 2)
    print(f"{U.machine()}: one process x {args.threads} threads "
          f"vs two processes x {half} threads, the same work ({2 * args.reps} units of batch {args.batch})")
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_toy_model(Path(tmp) / "model")
        for kind in args.kinds:
            one, two = [], []
            for _ in range(args.rounds):
                one.append(seconds([launch(kind, args.threads, 2 * args.reps, args.batch, folder)]))
                two.append(seconds([launch(kind, half, args.reps, args.batch, folder) for _ in range(2)]))
            a, b = statistics.median(one), statistics.median(two)
            units = 2 * args.reps
            print(f"  {kind:>10}: one process {1000 * a / units:7.1f} ms/unit, two side by side "
                  f"{1000 * b / units:7.1f} ms/unit   one / two: {a / b:.2f}   "
                  f"(rounds {', '.join(f'{x:.1f}' for x in one)} s / {', '.join(f'{x:.1f}' for x in two)} s)")


if __name__ == "__main__":
    main()
