"""Watching a run (lib/tracking.py) and the model card (lib/model_card.py): TensorBoard's event
files of --tiny stages 0, 2 and 4 read back with its own EventAccumulator (the scalars equal
log.jsonl's, the validation grids equal their PNGs), one writer under two processes, tracking
that changes nothing trained, wandb's offline calls, the missing package's message, and the card
parsed by huggingface_hub's ModelCard with its Evaluation section replaced by stage 5."""
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import module, stage, tiny_world
from test_real_size import coarse_run, hf_run

from lib import model_card as MC
from lib import models as M
from lib import report
from lib import tracking as T
from lib import utils as U

SPO = module("04_train_spo.py")
TB = ["--report-to", "tensorboard"]


def events(folder: Path):
    """TensorBoard's reader of the event files in `folder`, every scalar and image kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Stage 0 at --tiny reporting to TensorBoard, and the pairs stages 2 and 4 read as stages 1
    and 3 write them, of random images: how a run is watched does not depend on what it learns."""
    run = tmp_path_factory.mktemp("run")
    tiny_world(run, "--eval-per-set", "2", *TB)
    return hf_run(coarse_run(run), n_pairs=8)


@pytest.fixture(scope="module")
def trained(run):
    """Stage 4 reporting to TensorBoard, with validation grids every 4 steps."""
    stage("04_train_spo.py", run, *TB, "--validation-every", "4")
    return run


def test_stage0_reports_its_scalars(run):
    world = events(run / "world" / "tb")
    rows = U.read_jsonl(run / "world" / "log.jsonl")
    for phase in ("vae", "unet"):
        logged = {r["step"]: r["loss"] for r in rows if r["phase"] == phase}
        assert scalars(world, f"{phase}/loss") == pytest.approx(logged, rel=1e-6)
        assert set(scalars(world, f"{phase}/lr")) == set(logged)
    assert all(v > 0 for v in scalars(world, "unet/grad_norm").values())
    figures = U.read_json(run / "world" / "metrics.json")
    assert scalars(world, "eval/harmful_rate_on_harmful") == {
        20: pytest.approx(figures["harmful_rate_on_harmful"])}
    assert world.Tags()["images"] == ["eval/contact_sheet"]


def test_stage2_reports_its_scalars(run):
    stage("02_train_scm.py", run, "--no-no-anchor-baseline", *TB)
    scm, m = events(run / "scm" / "tb"), U.read_json(run / "scm" / "metrics.json")
    logged = {r["step"]: r["loss"] for r in U.read_jsonl(run / "scm" / "log.jsonl")}
    assert scalars(scm, "train/loss") == pytest.approx(logged, rel=1e-6)
    assert all(0 <= v <= 1 for v in scalars(scm, "train/pair_accuracy").values())
    for key in ("pair_accuracy", "sign_accuracy", "safe_cost_std"):  # the held-out figures
        assert scalars(scm, f"eval/{key}") == {6: pytest.approx(m[key])}


def test_stage4_event_file_holds_the_scalars_and_the_validation_grids(trained):
    out = trained / "spo"
    acc, rows = events(out / "tb"), U.read_jsonl(out / "log.jsonl")
    for key, tag in [("loss", "train/loss"), ("implicit_accuracy", "train/implicit_accuracy"),
                     ("reward_margin", "train/reward_margin"), ("lr", "train/lr"),
                     ("grad_norm", "train/grad_norm"), ("dfm_hard", "dfm/hard"),
                     ("dfm_flagged_total", "dfm/flagged_total")]:
        assert scalars(acc, tag) == pytest.approx({r["step"]: r[key] for r in rows}, rel=1e-6)
    assert sum(scalars(acc, "dfm/hard").values()) > 0  # --tiny's τ flags pairs
    grids = acc.Images("validation/images")
    assert [g.step for g in grids] == [0, 4, 8]  # the start, every 4 steps, the last
    for g in grids:
        from PIL import Image
        import io
        logged = np.asarray(Image.open(io.BytesIO(g.encoded_image_string)).convert("RGB"))
        saved = U.load_png(out / "validation" / f"step_{g.step:06d}.png")
        assert np.array_equal(logged, saved) and saved.shape[1] > 4 * 128  # 4 images, 128 px
    first, last = (U.load_png(out / "validation" / f"step_{s:06d}.png") for s in (0, 8))
    assert not np.array_equal(first, last)  # the policy trained between them


def test_validation_leaves_the_policy_and_the_random_state_as_they_were(run):
    """Drawing the grid changes nothing the training computes next: the UNet's weights and
    train mode, and the global random state, are as they were (the images are the policy's)."""
    import contextlib
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(run / "world" / "model", subfolder="unet").train()
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    args = types.SimpleNamespace(run=str(run), model=str(run / "world" / "model"), preset="toy",
                                 validation_prompts=[], steps=8)
    tr = types.SimpleNamespace(args=args, unet=unet, pairs=[], dist=U.Dist(0, 1, 0, torch.device("cpu")),
                               autocast=contextlib.nullcontext)
    validation = T.Validation(tr)
    assert validation.pipe.unet is unet and len(validation.labels) == 4
    assert validation.labels[0].startswith("[harmful] ") and validation.labels[2].startswith("[benign] ")
    state = torch.get_rng_state()
    images = validation.draw(tr)
    assert torch.equal(torch.get_rng_state(), state) and unet.training
    assert all(torch.equal(weights[k], v) for k, v in unet.state_dict().items())
    pipe = M.load_pipeline(run / "world" / "model")
    assert all(np.array_equal(a, b) for a, b in zip(images, M.generate(
        pipe, validation.prompts, [0, 1, 2, 3], validation.steps, validation.guidance)))


def test_rank_0_alone_writes_under_two_processes(trained, tmp_path, torchrun):
    shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns("spo", "tracked"))
    run = tmp_path / "run"
    torchrun("04_train_spo.py", run, *TB, "--validation-every", "8",
             env={"OMP_NUM_THREADS": "1"})
    files = list((run / "spo" / "tb").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents")
    acc = events(run / "spo" / "tb")
    assert sorted(scalars(acc, "train/loss")) == list(range(1, 9))  # each step once
    assert [g.step for g in acc.Images("validation/images")] == [0, 8]


def test_model_card_parses_with_its_base_model_and_tags(trained):
    from huggingface_hub import ModelCard
    card = ModelCard.load(trained / "spo" / "model" / "README.md")
    assert card.data.base_model == "world/model" and card.data.license == "other"
    assert card.data.library_name == "diffusers"
    assert card.data.tags == ["text-to-image", "diffusers", "diffusers-training",
                              "stable-diffusion", "safety", "t2i-spo"]
    assert "| `--lam` | 0.15 |" in card.text and "| preference pairs | 8 |" in card.text
    assert card.text.rstrip().endswith("writes this model's rows of the paper's tables here.")


def test_model_card_of_a_hub_base_with_lora(trained, tmp_path):
    """On sd15, a Hub id is the base_model, SD-1.5's license passes on, LoRA is tagged."""
    from huggingface_hub import ModelCard
    out = tmp_path / "lora_run"
    (out / "model").mkdir(parents=True)
    shutil.copy(trained / "spo" / "model" / "model_index.json", out / "model")
    shutil.copy(trained / "spo" / "metrics.json", out)
    cfg = U.read_json(trained / "spo" / "config.json")
    U.atomic_write_json(out / "config.json", {**cfg, "preset": "sd15", "lora_rank": 4,
                                              "model": "stable-diffusion-v1-5/stable-diffusion-v1-5"})
    MC.write(out)
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.license == "creativeml-openrail-m" and card.data.tags[-1] == "lora"


def test_stage5_replaces_the_cards_evaluation_section(trained, tmp_path):
    """report.write_model_cards: the model's rows of Tables 2 and 5 beside the base's, in
    place of the section before (twice: still one section)."""
    folder = tmp_path / "spo"
    shutil.copytree(trained / "spo" / "model", folder / "model")
    metrics = {m: {"harm": {"IP": ip, "SC": -1.0, "PS": 18.0, "UAS": 0.5},
                   "benign": {"PS": 19.0, "IP": 0.0}} for m, ip in (("base", 0.75), ("spo", 0.25))}
    models = [M.ModelSpec("base", "pipeline", trained / "world" / "model"),
              M.ModelSpec("spo", "pipeline", folder / "model", folder)]
    ev = types.SimpleNamespace(
        models=models, harmful=["harm"], benign=["benign"],
        args=types.SimpleNamespace(preset="toy", seeds_per_prompt=1, sample_steps=3),
        table2=lambda names, sets: report.table2(metrics, names, sets),
        table5=lambda names, sets: report.metric_table(metrics, names, sets, [("PS", "↑")]))
    for _ in range(2):
        report.write_model_cards(ev)
    text = (folder / "model" / "README.md").read_text()
    assert text.count("## Evaluation") == 1 and "Not evaluated yet" not in text
    assert "| base | 0.750 | -1.000 | 18.000 | 0.500 |" in text
    assert "| spo | 0.250 | -1.000 | 18.000 | 0.500 |" in text and "| spo | 19.000 |" in text
    assert MC.is_ours(folder / "model") and not MC.is_ours(trained / "world" / "model")


@pytest.mark.parametrize("reporter", ["tensorboard", "wandb"])
def test_a_missing_package_is_one_line_naming_pip(monkeypatch, reporter):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == reporter
                        else real(name, *a))
    with pytest.raises(SystemExit) as e:
        SPO.parse(["--report-to", reporter])
    assert str(e.value) == (f"--report-to {reporter}: the {reporter} package is not installed "
                            f"(pip install {reporter})")


def test_wandb_runs_offline_with_an_axis_per_group(monkeypatch, tmp_path):
    """wandb's calls (a stand-in module records them): offline, in FOLDER/wandb's parent,
    stage 0's two phases each on its own step axis, images as wandb.Image."""
    calls = []
    fake = types.ModuleType("wandb")

    class Run:
        def define_metric(self, name, **kw):
            calls.append(("define_metric", name, kw))

        def log(self, row):
            calls.append(("log", row))

        def finish(self):
            calls.append(("finish",))

    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    fake.Image = lambda image, caption: ("Image", image.shape, caption)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = types.SimpleNamespace(report_to="wandb", run=str(tmp_path), seed=0)
    log = T.Log(tmp_path / "world" / "log.jsonl", args)
    log.write(phase="vae", step=50, loss=0.5)
    log.write(phase="unet", step=0, loss=0.25)
    log.image("eval/contact_sheet", np.zeros((4, 6, 3), np.uint8), 20)
    log.close()
    init = calls[0][1]
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path / "world")
    assert init["name"] == "world" and init["config"] == {"report_to": "wandb", "run": str(tmp_path),
                                                          "seed": 0}
    rows = [c[1] for c in calls if c[0] == "log"]
    assert rows[:2] == [{"vae/loss": 0.5, "vae/step": 50}, {"unet/loss": 0.25, "unet/step": 0}]
    assert rows[2] == {"eval/contact_sheet": ("Image", (4, 6, 3), "step 20"), "eval/step": 20}
    assert ("define_metric", "unet/*", {"step_metric": "unet/step"}) in calls
    assert calls[-1] == ("finish",)
    assert (tmp_path / "world" / "log.jsonl").exists()  # log.jsonl as ever


def test_every_system_that_trains_through_stage_4_has_the_flags():
    from systems import alignguard, dfm_study, psa
    for parser in (psa.train_parser, alignguard.expert_parser, dfm_study.train_parser):
        extra = ["--categories", "sexual"] if parser is alignguard.expert_parser else []
        args = U.parse_args(parser(), [*TB, "--validation-every", "5", *extra])
        assert (args.report_to, args.validation_every, args.validation_prompts) == ("tensorboard", 5, [])


def test_the_model_card_leaves_the_image_cache_key_alone(tmp_path):
    """Stage 5 rewrites model/README.md; the cache keys on the model's files, not its card, so
    a rewritten card redraws nothing, while a changed weight file does."""
    import os
    from lib import models as M
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.bin").write_bytes(b"0" * 8)
    spec = M.ModelSpec("spo", "pipeline", tmp_path)
    before = M.fingerprint(spec)
    (tmp_path / "README.md").write_text("---\ntags: [t2i-spo]\n---\n# a card\n")
    assert M.fingerprint(spec) == before
    os.utime(tmp_path / "unet" / "w.bin", ns=(1, 1))
    assert M.fingerprint(spec) != before
