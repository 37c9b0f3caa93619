"""Plumbing every script shares (~600 lines): the command line and its presets, the threads
a trainer computes with, seeding and logging, torch.distributed, files written atomically,
checkpoints, and the small report helpers.

What it is not: the paper's equations (common.py), models and sampling (lib/models.py), what is
measured on an image (lib/scorers.py), statistics (lib/stats.py), data readers (lib/data.py).

  1. Presets and command lines: PRESETS, TINY, stage_parser, parse_args, save_config, run_stage,
     run_commands (the systems' `python FILE.py COMMAND ...`), load_script
  2. Seeding, logging, torch.distributed (and the split of a global batch over processes)
  3. Files: atomic writes, JSONL with line-numbered errors, checked rows, PNG images, tables
  4. Training state: Checkpoint, adamw, step_generator
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import io
import json
import os
import pickle
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root


class DataError(ValueError):
    """Bad input data; the message names the file (and line) at fault."""


# ----------------------------------------------------------------------------------------
# 1. Presets and command lines. One code path: a preset is only defaults.
# ----------------------------------------------------------------------------------------

# Per preset, per stage: the defaults of that stage's flags; `--tiny` lays TINY on top.
# parse_args installs them before parsing, so `--help` shows the preset's values and an
# explicit flag always wins. Each stage script (and each system in systems/) fills its own
# entries when it is imported.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "toy": {},
    "sd15": {},
    "sdxl": {},  # stage 4 on SDXL (Appendix E); its other stages are sd15's (PRESET_PARENT)
}
PRESET_PARENT = {"sdxl": "sd15"}  # a stage a preset gives no values of its own takes its parent's
TINY: dict[str, dict[str, Any]] = {}
# The toy's own choice: every toy stage samples with 10 DDIM steps at guidance 4. On the stage-0
# model 10 steps give the harmful rate and toy quality of 20 within noise in less than half the
# time (docs/results.md, "Sampling steps"), and stages 1, 3 and 5 draw about 6,000 images per
# `make toy`. Guidance 4 is the toy's own setting too; no comparison with other scales is recorded.
# SD-1.5 evaluates with 50 steps at guidance 7.5, as AlignGuard's inference.py
# (Visualignment/SafetyDPO) and RECE's validation do; its data stages 1 and 3 draw with 30
# steps, this reproduction's own number, not a peer's.
TOY_SAMPLE_STEPS = 10

STAGES = {  # stage key -> (script, folder under --run)
    "world": ("00_toy_world.py", "world"),
    "prompts": ("00_curate_prompts.py", "prompts"),
    "coarse": ("01_build_coarse.py", "coarse"),
    "scm": ("02_train_scm.py", "scm"),
    "hf": ("03_build_hf.py", "hf"),
    "coprov2": ("03_build_hf.py --pairing prompt-edit --name coprov2 --reuse-images hf", "coprov2"),
    "spo": ("04_train_spo.py", "spo"),
    "safety": ("04_train_spo.py --objective safety", "safety"),
    "users": ("-m systems.psa users", "world/users"),
    "psa": ("-m systems.psa train", "psa"),
    "eval": ("05_evaluate.py", "eval"),
}


SHARED_FLAGS = ("run", "preset", "seed", "tiny", "stop_after", "help")


def stage_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """The flags every stage shares; the script adds its own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # --run-dir is the same flag: under torchrun on Python 3.11, "--run" is refused as an
    # ambiguous prefix of torchrun's own --run-path before the script sees it.
    p.add_argument("--run", "--run-dir", dest="run", default=None,
                   help="run folder shared by all stages (default: runs/<preset>)")
    p.add_argument("--preset", default="toy", choices=sorted(PRESETS), help="toy (CPU, minutes) or sd15 (GPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="smallest settings, for tests and smoke runs")
    p.add_argument("--stop-after", type=int, default=None,
                   help="leave after this many training steps, as if killed (a later run resumes)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads the training computes with (use_threads); 0: torch's default")
    p.set_defaults(_stage=stage)
    return p


def use_threads(args: argparse.Namespace) -> argparse.Namespace:
    """Train on --threads CPU threads, whatever the machine's core count. A backward pass
    splits its sums over the threads, so its rounding follows their number: one step of stage
    0's UNet on 2 threads and on 4 gives 96 of its 380 gradient tensors other last bits (1
    against 2: 255), and a draw of the toy world would follow the cores as it follows the CPU
    kind. Sampling gave the same images on 1, 2 and 4 threads (docs/results.md, "The
    cores"). The toy's presets set the counts its stages use on 2 cores under `make toy`;
    0, or a command without the flag (one that trains nothing), leaves torch's default."""
    threads = getattr(args, "threads", 0)
    if threads < 0:
        raise SystemExit(f"--threads {threads}: give a count of threads, or 0 for torch's default")
    if threads:
        torch.set_num_threads(threads)
    return args


def preset_defaults(preset: str, stage: str, tiny: bool) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    d = dict(PRESETS[preset].get(stage) or PRESETS[PRESET_PARENT.get(preset, preset)].get(stage, {}))
    if tiny:
        d.update(TINY.get(stage, {}))
    return d


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Two passes: read --preset/--tiny, install that preset's defaults, then parse all.
    Explicit flags always win over the preset. Every flag of a stage has an entry in each
    preset (None where the default is derived at run time, e.g. "the stage-0 model"), so a
    flag is never a silent None: one with no entry must be passed, or the stage stops."""
    pre = argparse.ArgumentParser(add_help=False)  # without -h, so --help shows the preset's values
    pre.add_argument("--preset", default="toy")
    pre.add_argument("--tiny", action="store_true")
    first, _ = pre.parse_known_args(argv)
    stage = parser.get_default("_stage")
    defaults = preset_defaults(first.preset, stage, first.tiny)
    known = {a.dest for a in parser._actions} - set(SHARED_FLAGS) - {"_stage"}
    if set(defaults) - known:
        raise ValueError(f"preset {first.preset!r} sets unknown {stage} options {sorted(set(defaults) - known)}")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    unset = sorted(k for k in known - set(defaults) if getattr(args, k) is None)
    if unset:
        flags = ", ".join("--" + k.replace("_", "-") for k in unset)
        raise SystemExit(f"preset {first.preset!r} gives no default for {flags} of stage {stage}; "
                         f"pass the flag explicitly")
    args.run = args.run or f"runs/{args.preset}"
    return args


def name_value_pairs(values, flag: str) -> dict[str, str]:
    """["a=x", "b=y"] -> {"a": "x", "b": "y"}; a malformed or repeated name stops the run."""
    pairs = {}
    for v in values or []:
        name, sep, value = v.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{flag}: expected NAME=PATH, got {v!r}")
        if name in pairs:
            raise SystemExit(f"{flag}: name {name!r} given twice")
        pairs[name] = value
    return pairs


def toy_world_input(args: argparse.Namespace, path: Path, flag: str) -> str:
    """A stage's default input from stage 0's toy world (DIR/world/...). Other presets have
    no toy world, so there the input must be named: stop saying which flag to pass."""
    if args.preset != "toy":
        raise SystemExit(f"--preset {args.preset}: pass {flag} (its default, {path}, is stage 0's toy world, "
                         f"which only --preset toy builds)")
    return str(path)


def stage_dir(run: str | Path, stage: str) -> Path:
    return Path(run) / STAGES[stage][1]


def require_inputs(paths: Iterable[str | Path], stage: str) -> None:
    """Stop with a message naming the earlier stage to run when its outputs are missing."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        script = STAGES[stage][0]
        raise SystemExit(f"missing input(s): {', '.join(missing)}\n"
                         f"run the earlier stage first: python {script} --run <same run folder>")


# Settings that change how a run is carried out but not what it computes: a run may resume
# with other values of these (a stage-4 run computes the same on any number of processes; a
# judge answers the same wherever it is served: its model and rubric decide, not its address).
RESUMABLE_WITH_OTHER = {"argv", "stop_after", "device", "log_every", "ckpt_every", "world_size", "processes",
                        "grad_accum", "baseline_in_parallel", "skip_bad", "judge_base_url", "judge_timeout",
                        "judge_retries", "report_to", "validation_every", "validation_prompts"}


def save_config(args: argparse.Namespace, out_dir: str | Path, check: bool = True,
                absent_means: dict | None = None, **extra) -> dict:
    """Write every setting the stage ran with next to its outputs (config.json). With `check`,
    a folder that already holds a run with other settings is never resumed or overwritten:
    the stage stops, saying what differs and how to write elsewhere. A setting that only one
    of the two configs has is no difference: a flag is added with the default that does what
    the code did before it existed, so a run folder of an older version resumes. Where a new
    default does something else, `absent_means` gives what a config without the flag ran with."""
    cfg = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    cfg.update(extra)
    cfg["argv"] = sys.argv
    path = Path(out_dir) / "config.json"
    if check and path.exists():
        old, new = read_json(path), json.loads(json.dumps(cfg, default=str))  # as JSON: paths are strings
        old = {**(absent_means or {}), **old}
        if isinstance(old.get("run"), str):  # a run folder moved or copied elsewhere is the same run
            old = json.loads(json.dumps(old).replace(json.dumps(old["run"])[1:-1], json.dumps(str(new["run"]))[1:-1]))
        diff = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(set(old) & set(new))
                if k not in RESUMABLE_WITH_OTHER and old[k] != new[k]]
        if diff:
            name = " (or --name NAME)" if "name" in cfg else ""
            raise SystemExit(f"{out_dir} holds a run with other settings ({'; '.join(diff)}).\n"
                             f"Write elsewhere with --run DIR{name}, or delete {out_dir} to start over.")
    atomic_write_json(path, cfg)
    return cfg


def run_stage(main) -> None:
    """Run a stage's main(): an error the user can cause (bad or missing data, an unreachable
    judge, a non-finite loss) ends in one message and exit status 1, with no traceback."""
    from lib.judge_client import JudgeError
    try:
        main()
    except (DataError, JudgeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def run_commands(commands: dict, doc: str) -> None:
    """`python FILE.py COMMAND [flags]` for a system's file: COMMAND picks one of `commands`
    (name -> (parser(), main(args))), whose flags are parsed with their preset's defaults and
    which runs as run_stage runs a stage."""
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(f"{doc.strip().splitlines()[0]}\nusage: python {Path(sys.argv[0]).name} "
                         f"{{{','.join(commands)}}} [flags]   (a command's --help lists its flags)")
    name = sys.argv.pop(1)
    sys.argv[0] = f"{sys.argv[0]} {name}"
    parser, main = commands[name]
    run_stage(lambda: main(use_threads(parse_args(parser()))))


def load_script(filename: str):
    """A stage script imported as a module (its name starts with a digit, so `import` cannot):
    how another system trains through stage 4's loop."""
    name = "stage_" + Path(filename).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# ----------------------------------------------------------------------------------------
# 2. Seeding, logging, torch.distributed
# ----------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    return rank() == 0


def log(*msg) -> None:
    """print on rank 0 only (stdout, flushed so torchrun interleaves cleanly)."""
    if is_main():
        print(*msg, flush=True)


def machine() -> str:
    """The CPU as /proc/cpuinfo names it (model name, family, model), and its cores: what a
    result table is headed by, since kernels round differently on each CPU kind."""
    info = {}
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    name = info.get("model name") or platform.processor() or "unknown CPU"
    return (f"{name} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}), "
            f"{os.cpu_count()} cores")


class MetricsLog:
    """Append-only JSONL metrics log (rank 0 writes). Each record gets a wall-clock stamp.
    A resumed run first drops the records of the steps it is about to redo (`truncate`), so
    the log holds every step exactly once however often the run was killed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.t0 = time.time()

    def truncate(self, keep) -> None:
        """Keep only the records for which `keep(record)` is true (rank 0; no file: nothing)."""
        if is_main() and self.path.exists():
            write_jsonl(self.path, [r for r in read_jsonl(self.path) if keep(r)])

    def write(self, **record) -> None:
        if not is_main():
            return
        record.setdefault("time", round(time.time() - self.t0, 3))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Dist:
    """What a process knows about its place in the job."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or torch.distributed.is_initialized()


def setup_distributed(device: str | None = None, timeout_hours: float | None = None) -> Dist:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set): NCCL on GPU,
    gloo on CPU. A plain `python script.py` runs as a single process with no group.
    `timeout_hours`: how long a collective may wait (torch's default is minutes); the data
    stages wait at one barrier while the slowest process finishes its share of the chunks."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        kw = {"timeout": datetime.timedelta(hours=timeout_hours)} if timeout_hours else {}
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo", **kw)
        dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, dev)
    return Dist(0, 1, 0, torch.device("cuda" if use_cuda else "cpu"))


def check_batch_split(batch: int) -> None:
    """A global batch is split over the processes position by position (rank r takes
    positions r, r + N, ...), so any --batch of at least N runs; fewer would leave a process
    without a pair. Checked before the process group forms: rank 0 says why, the others leave."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch < world:
        if int(os.environ.get("RANK", "0")) == 0:
            raise SystemExit(f"--batch {batch} is smaller than the {world} processes: every process needs a pair of "
                             f"each batch. Pass --batch {world} or more, or start at most {batch} processes.")
        sys.exit(1)


def cleanup_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _group_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def my_share(items: Sequence) -> list:
    """This process's share of independent work items (every N-th from its rank): how the
    data-generation stages split their chunks over `torchrun` processes. Alone: everything."""
    return list(items)[rank()::_group_size()]


def barrier() -> None:
    """Wait until every process gets here (no-op alone)."""
    if _group_size() > 1:
        torch.distributed.barrier()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate an equal-shaped tensor from every rank, rank-major (identity alone)."""
    if _group_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_group_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_positions(x: torch.Tensor, n: int) -> torch.Tensor:
    """The rows of a global batch of n items in their global order, when rank r holds those of
    positions r, r + N, r + 2N, ... (DistributedSampler's interleaving; identity alone). Ranks
    may hold one row more or fewer than each other when N does not divide n."""
    world = _group_size()
    if world == 1:
        return x
    padded = torch.zeros((-(-n // world), *x.shape[1:]), dtype=x.dtype)
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    out = torch.empty((n, *x.shape[1:]), dtype=x.dtype)
    for r, part in enumerate(parts):
        out[r::world] = part[:len(range(r, n, world))]
    return out


def allreduce_gradients(params: Iterable[torch.nn.Parameter], bucket_numel: int = 2**25) -> None:
    """Sum every parameter's .grad over all ranks, in flat buckets: the reduction DDP performs,
    without overlapping it with the backward pass. A parameter with no gradient on this rank
    contributes zeros, so the ranks always reduce the same buckets."""
    if _group_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for p in params + [None]:
        if p is not None:
            bucket.append(p.grad)
            size += p.grad.numel()
        if bucket and (p is None or size >= bucket_numel):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            torch.distributed.all_reduce(flat)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))
            bucket, size = [], 0


# ----------------------------------------------------------------------------------------
# 3. Files: atomic writes (temp file in the same folder, fsync, rename), JSONL, PNG, tables
# ----------------------------------------------------------------------------------------

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record); a malformed line raises DataError naming file:line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | Path) -> list[dict]:
    return [row for _, row in iter_jsonl(path)]


def read_checked_rows(path: str | Path, check, skip_bad: bool) -> tuple[list[dict], int]:
    """The rows of a JSONL dataset that pass `check(row)` (which raises KeyError, TypeError or
    ValueError on a bad row and may add fields). A bad row stops the run naming file and
    line, or with skip_bad is skipped, logged and counted: (rows, number skipped)."""
    rows, bad = [], 0
    for lineno, row in iter_jsonl(path):
        try:
            check(row)
        except (KeyError, TypeError, ValueError) as e:
            msg = f"{path}:{lineno}: bad pair row ({f'missing {e.args[0]!r}' if isinstance(e, KeyError) else e})"
            if not skip_bad:
                raise DataError(msg + "; fix it or pass --skip-bad") from None
            log(f"skipping {msg}")
            bad += 1
            continue
        rows.append(row)
    return rows, bad


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def format_metrics(d: dict) -> str:
    """A stage's metrics.json as aligned lines for the console."""
    return "\n".join(f"  {k:30s} {v:.4g}" if isinstance(v, float) else f"  {k:30s} {v}" for k, v in d.items())


def fmt(v) -> str:
    return str(v) if isinstance(v, (int, np.integer)) else f"{v:.3f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; numbers to three decimals, strings as they are."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished folder into place (the old one, if any, is removed after the swap)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Atomic PNG write of a uint8 [H, W, 3] array."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def load_png(path: str | Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ----------------------------------------------------------------------------------------
# 4. Training state: one checkpoint file, the optimizer, each step's randomness
# ----------------------------------------------------------------------------------------

class Checkpoint:
    """One training state file, written atomically; `load` returns None when absent.
    Training loops draw each step's randomness from a generator seeded by (seed, step), so
    model + optimizer + scheduler + step is all that exact resumption needs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def save(self, state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.path, buf.getvalue())

    def load(self) -> dict | None:
        """The saved state, or None when absent. weights_only: tensors and plain Python values
        alone are read, so a tampered file cannot run code; anything else stops the run."""
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise DataError(f"{self.path}: refused, it holds more than tensors and plain values "
                            f"({str(e).splitlines()[-1]}); delete it to start that run over") from None


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the multi-tensor ("foreach") update on every device. On the CPU PyTorch
    defaults to one small update per tensor: 42 ms a step for stage 0's UNet + text encoder
    (244 tensors) against 25 ms (bench/bench_toy_pipeline.py). The arithmetic is the same,
    bit for bit (tests/test_utils.py checks), so it changes speed and nothing else. (The
    fused kernel takes 8 ms but rounds differently, so it would change every toy result.)"""
    return torch.optim.AdamW(params, foreach=True, **kwargs)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 64-bit hash of (seed, step, stream): two different triples share no seed. (An affine
    seed such as (seed·P + step)·7 + stream gives stream 7 of step s the seed of stream 0 of
    step s + 1; stage 4 draws t and ε from stream 0 and each hard pair's augmentations from
    stream 1 + its batch position.)"""
    key = f"{seed},{step},{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The randomness of one (step, stream) of a run, independent of every other."""
    return torch.Generator().manual_seed(step_seed(seed, step, stream))

