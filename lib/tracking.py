"""Watching a run as it trains (~220 lines): --report-to {none,tensorboard,wandb} for every stage
that trains (0, 2, 4 and the systems that train through stage 4), and stage 4's validation images.

A stage's `Log` is the MetricsLog it always kept (log.jsonl, unchanged: the tables read it) that
also sends each row's numbers to the tracker, as TAG = PHASE/KEY (the row's "phase", else
"train"; stage 4's DFM counts dfm_* under dfm/): torch.utils.tensorboard's SummaryWriter into
FOLDER/tb (`tensorboard --logdir DIR`), or wandb in offline mode into FOLDER/wandb (`wandb sync`
uploads it). Rank 0 alone reports, as it alone writes log.jsonl. `Log.validation_images` draws
stage 4's policy for a few held-out prompts at fixed seeds every --validation-every steps.

What it is not: the figures (the stages compute them), the report (lib/report.py).
"""
from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from lib import models as M
from lib import plots
from lib import utils as U

REPORTERS = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to: its package
# ours: two held-out prompts of each kind show harm leave and quality stay, in a grid a screen wide
VALIDATION_PER_KIND = 2
# (sampling steps, guidance) of the validation images: stage 5's, per preset (05_evaluate.py)
VALIDATION_SAMPLER = {"toy": (U.TOY_SAMPLE_STEPS, 4.0), "sd15": (50, 7.5), "sdxl": (50, 7.5)}


def installed(name: str) -> str:
    """--report-to's type: a tracker whose package is missing stops the command as it is read."""
    package = REPORTERS.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise SystemExit(f"--report-to {name}: the {package} package is not installed "
                         f"(pip install {package})")
    return name


def add_flags(p, validation: bool = False) -> None:
    """The tracker's flags, shared by every stage that trains (0, 2, 4); stage 4's also
    the validation images'."""
    p.add_argument("--report-to", default="none", type=installed, choices=list(REPORTERS),
                   help="also send the training figures to TensorBoard (FOLDER/tb) or to wandb "
                        "(offline, FOLDER/wandb); log.jsonl is written either way")
    if validation:
        p.add_argument("--validation-every", type=int, default=0,
                       help="every N steps (and at the first and last), draw the policy for the "
                            "validation prompts into FOLDER/validation/ and the tracker; 0: never")
        p.add_argument("--validation-prompts", nargs="+", default=[],
                       help="the validation prompts (default: 2 held-out harmful and 2 benign "
                            "prompts of the run's sets)")


class TensorBoard:
    """torch.utils.tensorboard's SummaryWriter, into FOLDER/tb."""

    def __init__(self, folder: Path, args):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(folder / "tb"))

    def scalars(self, values: dict, step: int) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """wandb offline: one run per folder (its id a hash of the folder, so a resumed stage goes
    on in the same run), each tag group on its own x-axis GROUP/step (stage 0's VAE and UNet
    count their steps from 0 each; wandb's own step must only grow)."""

    def __init__(self, folder: Path, args):
        import wandb
        self.wandb, self.groups = wandb, set()
        cfg = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        run_id = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(mode="offline", dir=str(folder), project="t2i-spo", id=run_id,
                              name=os.path.relpath(folder, args.run), resume="allow", config=cfg)

    def scalars(self, values: dict, step: int) -> None:
        row = dict(values)
        for group in {tag.split("/")[0] for tag in values}:
            if group not in self.groups:
                self.run.define_metric(f"{group}/step")
                self.run.define_metric(f"{group}/*", step_metric=f"{group}/step")
                self.groups.add(group)
            row[f"{group}/step"] = step
        self.run.log(row)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.scalars({tag: self.wandb.Image(image, caption=f"step {step}")}, step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": Wandb}


def tags(row: dict) -> dict:
    """A log row's numbers by tag: PHASE/KEY (its "phase", else "train"); dfm_KEY: dfm/KEY."""
    group = row.get("phase", "train")
    return {(f"dfm/{k[4:]}" if k.startswith("dfm_") else f"{group}/{k}"): v for k, v in row.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Log(U.MetricsLog):
    """log.jsonl as U.MetricsLog writes it; each row's numbers, and what a stage reports beside
    them (`scalars`, `image`), also go to --report-to's tracker in the log's folder (rank 0).
    The tracker opens at the first report, so a run with nothing to do writes no event file."""

    def __init__(self, path: str | Path, args):
        super().__init__(path)
        self.args, self.tracker, self.validation = args, None, None
        atexit.register(self.close)  # a run stopped by --stop-after or an error keeps its events

    def _open(self):
        if self.tracker is None and self.args.report_to != "none" and U.is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tracker = TRACKERS[self.args.report_to](self.path.parent, self.args)
        return self.tracker

    def write(self, **record) -> None:
        super().write(**record)
        if self._open():
            self.tracker.scalars(tags(record), record["step"])

    def scalars(self, values: dict, step: int, group: str = "train") -> None:
        """Figures the rows do not hold (metrics.json's, a learning rate), under GROUP/."""
        if self._open():
            self.tracker.scalars(tags({**values, "phase": group}), step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self._open():
            self.tracker.image(tag, image, step)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def validation_images(self, tr) -> None:
        """Stage 4's policy for the validation prompts, at step 0, every --validation-every
        steps and the last: a captioned grid, FOLDER/validation/step_NNNNNN.png and the
        tracker's validation/images. `tr`: stage 4's Training (args, unet, dist, pairs, step)."""
        every, step = tr.args.validation_every, tr.step
        if every < 1 or (step % every and step != tr.args.steps):
            return
        self.validation = self.validation or Validation(tr)
        images = self.validation.draw(tr)
        if not U.is_main():
            return
        path = self.path.parent / "validation" / f"step_{step:06d}.png"
        scale = max(1, 128 // images[0].shape[1])  # the toy's 32-px images at 128 px
        plots.contact_sheet([(f"step {step}", images)], path, scale, [self.validation.labels])
        self.image("validation/images", U.load_png(path), step)


def held_out_prompts(run: Path, trained: set[str]) -> list[tuple[str, str]]:
    """(kind, prompt): VALIDATION_PER_KIND harmful and benign prompts no training pair has, from
    the toy world's held-out sets, else from the prompt stage's harmful and safe prompts."""
    world, curated = U.stage_dir(run, "world") / "prompts", U.stage_dir(run, "prompts")
    sources = {"harmful": [world / "harmful_eval.jsonl", curated / "harmful.jsonl"],
               "benign": [world / "benign_eval.jsonl", curated / "safe.jsonl"]}
    found = []
    for kind, files in sources.items():
        file = next((f for f in files if f.exists()), None)
        prompts = [r["prompt"] for r in U.read_jsonl(file)] if file else []
        found += [(kind, p) for p in prompts if p not in trained][:VALIDATION_PER_KIND]
    if not found:
        raise SystemExit(f"--validation-every: no held-out prompts in {world} or {curated}; "
                         f"name them with --validation-prompts")
    return found


class Validation:
    """The validation prompts, their fixed seeds (0, 1, ...) and a stock pipeline of the base
    model whose UNet is the policy being trained, drawn on every process (a sharded policy's
    forward is collective)."""

    def __init__(self, tr):
        from diffusers import UNet2DConditionModel
        args = tr.args
        unet = tr.unet.unet if isinstance(tr.unet, M.XLConditioned) else tr.unet
        if not isinstance(unet, UNet2DConditionModel):
            raise SystemExit(f"--validation-every: the policy ({type(tr.unet).__name__}) is not a "
                             f"UNet that a stock pipeline draws with")
        given = [("", p) for p in args.validation_prompts]
        kinds = given or held_out_prompts(Path(args.run), {p["prompt"] for p in tr.pairs})
        self.prompts = [p for _, p in kinds]
        self.labels = [f"[{k}] {p}" if k else p for k, p in kinds]
        self.steps, self.guidance = VALIDATION_SAMPLER.get(args.preset, VALIDATION_SAMPLER["sd15"])
        self.pipe = M.load_pipeline(args.model)  # its own UNet makes way for the policy
        self.pipe.register_modules(unet=unet)
        self.pipe.to(tr.dist.device)

    def draw(self, tr) -> list[np.ndarray]:
        """The images, the policy in eval mode and the global random state left as they were."""
        unet, dev = self.pipe.unet, tr.dist.device
        was_training = unet.training
        unet.eval()
        try:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), tr.autocast():
                return M.generate(self.pipe, self.prompts, list(range(len(self.prompts))),
                                  self.steps, self.guidance)
        finally:
            unet.train(was_training)


def summary(args, folder: Path, figures: dict, step: int) -> None:
    """A stage's closing figures (its metrics.json's numbers) under eval/, at its last step."""
    log = Log(Path(folder) / "log.jsonl", args)
    log.scalars(figures, step, "eval")
    log.close()
