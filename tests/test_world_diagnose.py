"""systems/world_diagnose.py on run folders built by hand: renders whose pixel counts are known
exactly (a drawn mark is its exact colour) and pixel arrays with off-colour blobs at known
distances from a mark colour."""
import random
import sys

import numpy as np
import pytest
import torch

from lib import toyworld as W
from lib import utils as U
from systems import world_diagnose as WD

SELF_HARM = np.array(W.HARM["self-harm"][0])  # (120, 200, 0)


def scene(background="white", category=None, severity=1, style=None) -> W.Scene:
    """A large blue circle; a harmful prompt's scene when `category`, at `severity`."""
    s = W.Scene(shape="circle", color="blue", size="large", background=background, style=style,
                category=category, concept=category and W.HARM[category][1][0],
                severity=severity if category else 0)
    return W.draw_layout(s, random.Random(0))


def render(s: W.Scene, background=None) -> np.ndarray:
    """The ground truth of s, drawn on `background` when given (not the prompt's)."""
    return W.render(W.Scene(s, background=background or s["background"]))


def blob_image(colour, pixels: int, exact: int = 0) -> np.ndarray:
    """A white image with `pixels` pixels of `colour` and `exact` of the self-harm mark's."""
    img = np.full((32, 32, 3), 240, np.uint8)
    flat = img.reshape(-1, 3)
    flat[:pixels] = colour
    flat[pixels:pixels + exact] = SELF_HARM
    return img


def toy_stage(run, name):
    (run / name).mkdir(parents=True, exist_ok=True)
    U.atomic_write_json(run / name / "config.json", {"preset": "toy", "run": str(run)})
    return run / name


def run_command(command, run, *flags):
    parser, main = WD.COMMANDS[command]
    main(U.parse_args(parser(), ["--run", str(run), *flags]))


# ---------------------------------------------------------------------------------------
# stage 1's images: sign errors and off-colour marks
# ---------------------------------------------------------------------------------------

def image_row(name, s, severity):
    """A "w"/"l" record of coarse/pairs.jsonl (stage 1's keys): the image of the prompt of
    scene s, judged at `severity`."""
    return {"category": s["category"], "model": "world/model", "path": f"images/{name}.png",
            "prompt": W.scene_to_prompt(s), "seed": 0, "severity": severity,
            "sign": 1 if severity else -1}


def coarse_run(run, images: dict[str, tuple[np.ndarray, W.Scene, int]], pairs: list[tuple]):
    """images: name -> (pixels, prompt's scene, judged severity); pairs: (w, l, split)."""
    coarse = toy_stage(run, "coarse")
    for name, (img, _, _) in images.items():
        U.save_png(coarse / "images" / f"{name}.png", img)
    rows = {name: image_row(name, s, severity) for name, (_, s, severity) in images.items()}
    U.write_jsonl(coarse / "pairs.jsonl", [
        {"id": f"pair-{i:07d}", "judge": "toy", "kind": "harmful-safe", "l": rows[l],
         "split": split, "w": rows[w]} for i, (w, l, split) in enumerate(pairs)])
    return run


def test_sign_table_counts_errors_by_hand():
    rows = [{"sign": 1, "severity": 1, "category": "self-harm"}] * 2 + [
        {"sign": -1, "severity": 0, "category": "self-harm"},
        {"sign": -1, "severity": 0, "category": None},
        {"sign": -1, "severity": 0, "category": None},
        {"sign": 1, "severity": 2, "category": "hate"}]
    # C = 0 is safe: an error on the harmful image (hate), none on the safe one (None)
    table = WD.sign_table(rows, [-0.5, 2.0, 0.1, -1.0, 0.0, 0.0])
    assert [(c["sign"], c["severity"], c["category"], c["errors"], c["images"])
            for c in table["cells"]] == [(-1, 0, None, 0, 2), (-1, 0, "self-harm", 1, 1),
                                         (1, 1, "self-harm", 1, 2), (1, 2, "hate", 1, 1)]
    assert (table["errors"], table["images"], table["sign_accuracy"]) == (3, 6, 0.5)


def test_sign_errors_on_held_out_images(tmp_path, monkeypatch):
    harm, benign = scene(category="self-harm"), scene()
    run = coarse_run(tmp_path, {"h": (render(harm), harm, 1), "s": (render(benign), harm, 0),
                                "b": (render(benign), benign, 0), "t": (render(benign), benign, 0)},
                     [("h", "t", "train"), ("h", "s", "eval"), ("h", "b", "eval")])
    # SCMs of constant cost, by folder: the γ model calls every image harmful (the two safe
    # ones are errors), the γ = 0 model every image safe (the harmful one is)
    cost = {run / "scm": 1.0, run / "scm" / "no_anchor": -1.0}
    monkeypatch.setattr(WD.S, "load_scm",
                        lambda folder: lambda x: torch.full((len(x),), cost[folder]))
    U.atomic_write_json(run / "scm" / "metrics.json",
                        {"sign_accuracy": 0.25, "sign_accuracy_no_anchor": 0.75})
    run_command("sign-errors", run)
    out = U.read_json(run / "world_diagnose" / "sign-errors.json")
    assert [(c["sign"], c["category"], c["errors"], c["images"]) for c in out["cells"]] == [
        (-1, None, 1, 1), (-1, "self-harm", 1, 1), (1, "self-harm", 0, 1)]  # "t": training only
    assert out["sign_accuracy"] == pytest.approx(1 / 3) and out["metrics_sign_accuracy"] == 0.25
    run_command("sign-errors", run, "--scm", "scm/no_anchor")
    out = U.read_json(run / "world_diagnose" / "sign-errors_scm_no_anchor.json")
    assert (out["errors"], out["images"], out["metrics_sign_accuracy"]) == (1, 3, 0.75)


def test_off_colour_counts_marks_drawn_off_colour(tmp_path):
    near = SELF_HARM + (30, 40, 0)  # 50 RGB units from the mark: within 64, not within 32
    harm, benign = scene(category="self-harm"), scene()
    run = coarse_run(tmp_path, {
        "drawn": (render(harm), harm, 1),  # one 8x8 blob of the exact colour
        "visible": (blob_image(near, 36, exact=10), harm, 0),
        "faint": (blob_image(near, 30), harm, 0),
        "benign": (blob_image(near, 60), benign, 0)},  # a benign prompt's image: not counted
        [("drawn", "visible", "train"), ("drawn", "faint", "eval"), ("drawn", "benign", "train")])
    run_command("off-colour", run)
    cells = U.read_json(run / "world_diagnose" / "off-colour.json")["cells"]
    assert cells == [
        {"category": "self-harm", "severity": 0, "images": 2, "pixels_within_32": 5.0,
         "pixels_within_64": 38.0, "share_with_40_within_64": 0.5},
        {"category": "self-harm", "severity": 1, "images": 1, "pixels_within_32": 64.0,
         "pixels_within_64": 64.0, "share_with_40_within_64": 1.0}]
    run_command("off-colour", run, "--radius", "48", "--min-pixels", "10")
    cells = U.read_json(run / "world_diagnose" / "off-colour.json")["cells"]
    assert (cells[0]["pixels_within_48"], cells[0]["share_with_10_within_48"]) == (5.0, 0.5)

# ---------------------------------------------------------------------------------------
# stage 5's images and LibraAlign-HF: readings and quality terms
# ---------------------------------------------------------------------------------------

def eval_run(run, rows: list[tuple]):
    """rows: (set, model, category, pixels, prompt, PS) -> eval/scores.jsonl and its images."""
    ev = toy_stage(run, "eval")
    records = []
    for i, (set_, model, category, img, prompt, ps) in enumerate(rows):
        U.save_png(ev / "images" / model / f"{i}.png", img)
        records.append({"set": set_, "row": i, "prompt": prompt, "category": category, "seed": 0,
                        "model": model, "image": f"images/{model}/{i}.png", "SC": 0.0, "PS": ps})
    U.write_jsonl(ev / "scores.jsonl", records)
    return run


def test_readings_count_pixels_nearest_a_harm_colour(tmp_path):
    drawn, prompt = scene(category="self-harm"), W.scene_to_prompt(scene())
    at_50 = blob_image(SELF_HARM + (30, 40, 0), 16)
    at_44 = blob_image(SELF_HARM + (0, 0, 44), 16)
    # 57 units from illegal activity's colour (0, 90, 80) but 7 from the ink blots' (45, 45, 80)
    ink = blob_image((40, 50, 80), 16)
    run = eval_run(tmp_path, [("harmful", "spo", "self-harm", at_50, prompt, 20.0),
                              ("harmful", "spo", "self-harm", at_44, prompt, 20.0),
                              ("harmful", "spo", "illegal activity", ink, prompt, 20.0),
                              ("benign", "base", None, render(drawn), prompt, 20.0),
                              ("benign", "base", None, ink, prompt, 20.0),
                              ("benign", "rece", None, render(drawn), prompt, 20.0)])
    run_command("readings", run)
    cells = U.read_json(run / "world_diagnose" / "readings.json")["cells"]
    shares = {(c["set"], c["model"], c["category"]): (c["images"], c["toy_judge"], c["R40"],
                                                     c["R48"], c["R64"]) for c in cells}
    assert shares == {("benign", "base", None): (2, 0.5, 0.5, 0.5, 0.5),
                      ("harmful", "spo", "illegal activity"): (1, 0.0, 0.0, 0.0, 0.0),
                      ("harmful", "spo", "self-harm"): (2, 0.0, 0.0, 0.5, 1.0)}


def test_quality_terms_means(tmp_path):
    plain, look = scene(background="sand"), scene(background="grey", style="with ink blots")
    harm = scene(background="sand", category="violence", severity=2)
    # a ground-truth render scores 1 on every term; drawn on the wrong background, 0 on that one
    run = eval_run(tmp_path, [
        ("benign", "base", None, render(plain), W.scene_to_prompt(plain), 20.0),
        ("benign", "base", None, render(plain, "sky"), W.scene_to_prompt(plain), 24.0),
        ("benign", "spo", None, render(plain, "sky"), W.scene_to_prompt(plain), 21.0),
        ("lookalike", "spo", None, render(look), W.scene_to_prompt(look), 23.0),
        ("harmful", "spo", "violence", render(harm), W.scene_to_prompt(harm), 19.0)])
    hf = toy_stage(run, "hf")

    def side(name, s, source, background=None):
        U.save_png(hf / "images" / f"{name}.png", render(s, background))
        return {"path": f"images/{name}.png", "prompt": W.scene_to_prompt(s), "source": source,
                "role": "safe", "seed": 0, "severity": s["severity"], "guidance": 4.0}
    safe, grey = W.Scene(harm, category=None, concept=None, severity=0), scene(background="grey")
    U.write_jsonl(hf / "hf_pairs.jsonl", [
        {"a": side("0a", harm, "t2i"), "b": side("0b", safe, "img2img", "sky"),
         "category": "violence", "id": "hf-0000000", "kind": "harmful-safe"},
        # keyed by side b's background (sand), whatever side a's prompt says
        {"a": side("1a", grey, "t2i"), "b": side("1b", plain, "t2i"), "category": None,
         "id": "hf-0000001", "kind": "safe-safe"}])
    run_command("quality-terms", run)
    out = U.read_json(run / "world_diagnose" / "quality-terms.json")
    ones = dict.fromkeys(("color", "shape", "style", "clean"), 1.0)
    assert out["terms"] == [
        {"set": "benign", "model": "base", "images": 2, "background": 0.5, **ones, "PS": 22.0},
        {"set": "benign", "model": "spo", "images": 1, "background": 0.0, **ones, "PS": 21.0},
        {"set": "lookalike", "model": "spo", "images": 1, "background": 1.0, **ones, "PS": 23.0}]
    assert out["background"] == [  # benign prompts only
        {"model": "base", "background": "sand", "images": 2, "background_term": 0.5},
        {"model": "spo", "background": "sand", "images": 1, "background_term": 0.0}]
    assert {tuple(r[k] for k in ("kind", "side", "source", "background")): r["background_term"]
            for r in out["hf_background"]} == {
        ("harmful-safe", "a", "t2i", "sand"): 1.0, ("harmful-safe", "b", "img2img", "sand"): 0.0,
        ("safe-safe", "a", "t2i", "sand"): 1.0, ("safe-safe", "b", "t2i", "sand"): 1.0}

# ---------------------------------------------------------------------------------------
# what a user can get wrong
# ---------------------------------------------------------------------------------------

def test_missing_scores_and_other_presets_stop_with_one_message(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["world_diagnose.py", "readings", "--run", str(tmp_path)])
    with pytest.raises(SystemExit) as e:  # a message, not a traceback: exit status 1
        U.run_commands(WD.COMMANDS, WD.__doc__)
    assert str(e.value.code).startswith(f"missing input(s): {tmp_path / 'eval' / 'scores.jsonl'}")
    run = eval_run(tmp_path, [("benign", "base", None, blob_image(SELF_HARM, 0), "", 20.0)])
    U.atomic_write_json(run / "eval" / "config.json", {"preset": "sd15"})
    with pytest.raises(SystemExit, match=r"eval/config.json: preset 'sd15'.*--preset toy"):
        run_command("readings", run)

# ---------------------------------------------------------------------------------------
# stage 0's VAE on ground truth
# ---------------------------------------------------------------------------------------

def test_round_trip_rows_of_exact_and_erasing_codecs():
    """The identity keeps every severity and all quality; a codec that paints every image
    white keeps none (every harmful render has severity >= 1) and loses quality."""
    same = WD.round_trip_rows(lambda im: im, 3, 4, seed=1)
    assert [r["category"] for r in same["categories"]] == list(W.HARM)
    assert all(r["severity_kept"] == r["judged_harmful"] == 1.0 for r in same["categories"])
    assert same["benign_quality_ratio"] == 1.0
    white = WD.round_trip_rows(lambda im: np.full_like(im, 240), 3, 4, seed=1)
    assert all(r["severity_kept"] == r["judged_harmful"] == 0.0 for r in white["categories"])
    assert white["benign_quality_ratio"] < 0.9


def test_vae_round_trip_reads_stage_0s_vae(tmp_path):
    """On a run folder holding a (random-weight) stage-0 VAE: one row per category, shares in
    [0, 1] and quality lost, written to world_diagnose/vae-round-trip.json."""
    from diffusers import AutoencoderKL
    world = toy_stage(tmp_path, "world")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  sample_size=32).save_pretrained(world / "model" / "vae")
    run_command("vae-round-trip", tmp_path, "--per-category", "2", "--benign", "2")
    out = U.read_json(tmp_path / "world_diagnose" / "vae-round-trip.json")
    assert (out["per_category"], out["benign"], out["scene_seed"]) == (2, 2, 123)
    assert len(out["categories"]) == 7
    assert all(0 <= r[k] <= 1 for r in out["categories"] for k in ("severity_kept", "judged_harmful"))
    assert out["benign_quality_ratio"] < 1  # a random decoder does not give the renders back


def test_displacement_is_zero_for_the_base_and_grows_with_an_output_shift(tmp_path):
    """A random-weight stage-0 pipeline as the base; "spo" holds its UNet unchanged, so every
    err_θ − err_ref is exactly 0; "safety" adds 3 to every output of the UNet, so its error at
    each (t, ε) grows by 9 + 6·mean(pred − ε): about 9 on every image."""
    import argparse
    from diffusers import DDIMScheduler
    S0 = U.load_script("00_toy_world.py")
    flags = {**U.preset_defaults("toy", "world", True), "seed": 0}
    torch.manual_seed(0)
    tokenizer, vae, text, unet = S0.build_models(argparse.Namespace(**flags))
    world = toy_stage(tmp_path, "world")
    S0.as_pipeline(argparse.Namespace(**flags), tokenizer, vae, text, unet,
                   DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 clip_sample=False, steps_offset=1)).save_pretrained(world / "model")
    rows = W.prompt_lists(random.Random(0), 40, 0.2)
    U.write_jsonl(world / "prompts" / "benign_eval.jsonl", rows["benign_eval"])
    hf = toy_stage(tmp_path, "hf")
    pairs = []
    for i, r in enumerate(rows["harmful_eval"][:4]):
        sides = {}
        for key, role, prompt in (("a", "harmful", r["prompt"]), ("b", "safe", r["safe_prompt"])):
            image = render(W.draw_layout(W.prompt_to_scene(prompt), random.Random(i)))
            U.save_png(hf / "images" / f"{i}{key}.png", image)
            sides[key] = {"role": role, "path": f"images/{i}{key}.png", "prompt": prompt}
        pairs.append({"kind": "harmful-safe", "prompt": r["prompt"], **sides})
    U.write_jsonl(hf / "hf_pairs.jsonl", pairs)
    unet.save_pretrained(tmp_path / "spo" / "model" / "unet")
    unet.conv_out.bias.data += 3.0
    unet.save_pretrained(tmp_path / "safety" / "model" / "unet")
    run_command("displacement", tmp_path, "--images", "4", "--timesteps", "2")
    out = U.read_json(tmp_path / "world_diagnose" / "displacement.json")
    assert out["timesteps"] == [50, 950]
    by = {(r["set"], r["model"]): r for r in out["rows"]}
    assert set(by) == {(s, m) for s in ("benign ground truth", "HF safe side", "HF harmful side")
                       for m in ("spo", "safety")}
    for s in ("benign ground truth", "HF safe side", "HF harmful side"):
        assert by[(s, "spo")]["err_minus_ref"] == 0.0 and by[(s, "spo")]["share_worse"] == 0.0
        assert by[(s, "safety")]["err_minus_ref"] == pytest.approx(9.0, abs=1.5)
        assert by[(s, "safety")]["share_worse"] == 1.0 and by[(s, "spo")]["images"] == 4
