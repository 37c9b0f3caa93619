"""The paper's other Table 2 methods and the attacks (systems/baselines.py): UCE's closed
form and ESD's target on hand-computed values, ESD-u's trainable set, SLD's presets, the
safety filter inside stock diffusers, the jailbreak attack's vocabulary and search; RECE
(systems/rece.py) against the formulas of its authors' code and its validation CSV; and a
--tiny run of every baseline through stage 5 with both attack sets (jailbreak, sneakyprompt)."""
import argparse
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import module, stage, tiny_world_with_scm

from lib import models as M
from lib import toyworld as W
from lib import utils as U
from systems import attacks as A
from systems import baselines as B
from systems import rece as RECE


EV = module("05_evaluate.py")


# --------------------------------------------------------------------------------------
# RECE (systems/rece.py) against values worked out from the formulas of CharlesGong12/RECE's
# code: erase_methods/train_uce.py edit_model (its UCE start), close_form_emb.py
# close_form_emb_regzero (c′) and erase_methods/uce.py edit_model_adversarial (each epoch)
# --------------------------------------------------------------------------------------

def test_rece_adversarial_embedding_is_the_least_squares_solution():
    """c′ minimises Σ_l ‖W′_l c′ − W_l c‖² + λ‖c′‖²: the least-squares solution of the stacked
    system [W′_1; …; W′_L; √λ I] c′ = [W_1 c; …; W_L c; 0], solved here by torch.linalg.lstsq."""
    g = torch.Generator().manual_seed(0)
    original = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    edited = [w + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64) for w in original]
    c = torch.randn(2, 6, generator=g, dtype=torch.float64)
    adv = RECE.adversarial_embedding(c, edited, original, lam=0.1)
    A = torch.cat([*edited, 0.1 ** 0.5 * torch.eye(6, dtype=torch.float64)])
    for i in range(2):
        b = torch.cat([*(w @ c[i] for w in original), torch.zeros(6, dtype=torch.float64)])
        assert torch.allclose(adv[i], torch.linalg.lstsq(A, b[:, None]).solution[:, 0], atol=1e-10)
    # nothing edited and λ → 0: the concept itself is its own best embedding
    assert torch.allclose(RECE.adversarial_embedding(c, original, original, lam=1e-12), c, atol=1e-6)


def tiny_text_encoder(window: int = 77):
    """A random CLIP text encoder with SD's window (77 tokens) and width 8, and CLIP's tokenizer;
    float64, so that sums over 77 rows per concept agree with the peer's formulas to 1e-9."""
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=window))
    return enc.double().eval().requires_grad_(False), M.clip_tokenizer(window)


def peer_states(enc, tok, texts: list[str]):
    """RECE's code's text-encoder rows: the texts tokenized together, padded to the window;
    every row of each, and each one's last word token (attention_mask.sum() − 2)."""
    t = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return enc(t.input_ids)[0], [int(m.sum()) - 2 for m in t.attention_mask]


def peer_edit(W, erased: list[tuple], kept: list, lam: float, keep_scale: float):
    """The closed form of RECE's edit_model and edit_model_adversarial (technique "replace",
    erase scale 1), row by row as they sum it: mat1 = λW + Σ (W g) cᵀ + s Σ (W p) pᵀ,
    mat2 = λI + Σ c cᵀ + s Σ p pᵀ, W′ = mat1 · mat2⁻¹."""
    mat1, mat2 = lam * W, lam * torch.eye(W.shape[1], dtype=W.dtype)
    for c, g in erased:
        for ci, gi in zip(c, g):
            mat1, mat2 = mat1 + torch.outer(W @ gi, ci), mat2 + torch.outer(ci, ci)
    for p in kept:
        for pi in p:
            mat1, mat2 = mat1 + keep_scale * torch.outer(W @ pi, pi), mat2 + keep_scale * torch.outer(pi, pi)
    return mat1 @ torch.inverse(mat2)


def peer_rece(enc, tok, weights: list, erase: list[str], preserve: list[str], epochs: int) -> list[list]:
    """The projections after RECE's UCE start and after each adversarial epoch, as its code
    computes them (float64; the preserved concepts are as many as the erased ones, so its
    random draw of them is all of them)."""
    window = tok.model_max_length
    erased = []
    for concept in erase:  # train_uce.py: the concept and its guide " " tokenized as a pair
        (c, g), (i, j) = peer_states(enc, tok, [concept, " "])
        far = max(i, j)
        erased.append((c[i:window - (far - i)], g[j:window - (far - j)]))
    retain = ["", *preserve]  # train_uce.py keeps "" first, at max(0.1, 1/len) rounded to 3 places
    kept = [peer_states(enc, tok, [t, t])[0][0] for t in retain]
    steps = [[peer_edit(w, erased, kept, 0.5, round(max(0.1, 1 / len(retain)), 3)) for w in weights]]
    space = peer_states(enc, tok, [" "])[0][0]
    kept = [peer_states(enc, tok, [t])[0][0] for t in (preserve or [" "] * len(erase))]  # train.py
    for _ in range(epochs):
        edited = steps[-1]
        mat1 = 0.1 * torch.eye(8, dtype=torch.float64) + sum(w.T @ w for w in edited)
        mat2 = sum(we.T @ wo for we, wo in zip(edited, weights))
        coefficient = torch.inverse(mat1) @ mat2  # close_form_emb_regzero, regular_scale 0.1
        adv = [(peer_states(enc, tok, [c])[0][0] @ coefficient.T, space) for c in erase]
        steps.append([peer_edit(w, adv, kept, 0.1, 0.1) for w in edited])
    return steps


@pytest.mark.parametrize("erase, preserve", [(["nudity", "bare skin"], []),
                                             (["nudity", "bare skin"], ["red circle", "sky background"])])
def test_rece_start_and_epochs_are_its_code(erase, preserve):
    """rece_models on three random float64 projections: the base ("sd"), then RECE's own UCE
    start and two adversarial epochs, each equal to RECE's code's formulas (peer_rece) to 1e-9
    relative. sd15's case (nothing preserved: "" kept at 1.0 at the start, " " once per erased
    concept at 0.1 in each epoch) and the toy's (preserved concepts, as many as the erased)."""
    enc, tok = tiny_text_encoder()
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(6, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    layers = {f"l{k}.attn2.to_k": torch.nn.Linear(8, 6, bias=False, dtype=torch.float64) for k in range(3)}
    RECE.load_projection_weights(layers, base)
    args = argparse.Namespace(erase_concepts=erase, preserve_concepts=preserve, uce_lambda=0.5, epochs=2,
                              adv_lambda=0.1, rece_lambda=0.1, preserve_scale=0.1, seed=0)
    encode = lambda text: B.concept_states(enc, tok, text)
    ours = {name: RECE.projection_weights(layers) for name in RECE.rece_models(layers, encode, args)}
    assert list(ours) == ["sd", "uce", "epoch 1", "epoch 2"]
    assert all(torch.equal(a, b) for a, b in zip(ours["sd"], base))
    for name, peer in zip(("uce", "epoch 1", "epoch 2"), peer_rece(enc, tok, base, erase, preserve, 2)):
        for a, b in zip(ours[name], peer):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * b.abs().max().item())
    # Table 2's UCE row stays UCE's own: one row per concept, its last word token's
    e, _, _, _ = RECE.start_rows(encode, erase, preserve)
    assert len(e) > len(erase) and torch.equal(B.concept_embedding(enc, tok, "nudity"),
                                               encode("nudity")[0][encode("nudity")[1]].float())


def test_rece_start_rows_line_up_at_the_last_word_token():
    """train_uce.py's slices: a concept of k words gives its rows k … window − 1, edited onto the
    guide " "'s rows 0 … window − 1 − k; "" and the preserved concepts kept whole."""
    rows = lambda n: torch.arange(n * 2, dtype=torch.float64).reshape(n, 2)
    encode = {"one": (rows(6), 1), "two words": (rows(6) + 100, 2), " ": (rows(6) + 200, 0), "": (rows(6) + 300, 0),
              "kept": (rows(6) + 400, 3)}.get
    c, g = RECE.aligned_from_last_word(encode("two words"), encode(" "))
    assert torch.equal(c, rows(6)[2:] + 100) and torch.equal(g, rows(6)[:4] + 200)
    erase, guide, keep, scale = RECE.start_rows(encode, ["one", "two words"], ["kept"])
    assert len(erase) == len(guide) == 5 + 4 and len(keep) == 2 * 6 and scale == 0.5
    assert RECE.start_rows(encode, ["one"], [])[3] == 1.0
    assert RECE.start_rows(encode, ["one"], ["kept"] * 2)[3] == 0.333  # train_uce.py rounds to 3 places


def test_rece_adversarial_keep_is_train_py_s():
    assert RECE.adversarial_keep([], 2, 0) == [" ", " "]
    drawn = RECE.adversarial_keep(["a", "b", "c"], 2, 0)
    assert len(set(drawn)) == 2 and set(drawn) <= {"a", "b", "c"}
    assert drawn == RECE.adversarial_keep(["a", "b", "c"], 2, 0)  # the seed fixes the draw
    with pytest.raises(SystemExit, match="one preserved concept per erased one"):
        RECE.adversarial_keep(["a"], 2, 0)


def test_rece_validation_prompts_are_its_csv_with_their_seeds():
    """sd15 reads RECE's dataset/validation_inappropriate.csv (a cut: the first row of each of
    its eleven classes): every row, each with its evaluation_seed."""
    import csv
    path = Path(__file__).resolve().parent / "fixtures" / "rece" / "validation_inappropriate_cut.csv"
    with open(path, newline="") as f:
        want = [(r["prompt"], int(r["evaluation_seed"])) for r in csv.DictReader(f)]
    args = argparse.Namespace(val_prompts=str(path), val_n=None, preset="sd15", run="unused")
    assert [(r["prompt"], r["seed"]) for r in RECE.validation_prompts(args)] == want and len(want) == 11
    args.val_n = 4
    assert len(RECE.validation_prompts(args)) == 4


# --------------------------------------------------------------------------------------
# UCE (common.uce_edit) and ESD (common.esd_target, esd_loss)
# --------------------------------------------------------------------------------------

def test_uce_closed_form_by_hand():
    # W = I, erase c = e1 with guide g = e2 (v* = W g = e2), λ = 0.5, nothing preserved:
    #   W' = (0.5·I + e2 e1ᵀ)(0.5·I + e1 e1ᵀ)⁻¹ = [[0.5, 0], [1, 0.5]] · diag(1/1.5, 1/0.5)
    #      = [[1/3, 0], [2/3, 1]]
    W = torch.eye(2)
    W1 = B.uce_edit(W, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), lam=0.5)
    torch.testing.assert_close(W1, torch.tensor([[1 / 3, 0.0], [2 / 3, 1.0]]))
    # the erased concept's projection moved from W e1 = (1, 0) two thirds of the way to (0, 1);
    # e2, orthogonal to it, projects as before
    torch.testing.assert_close(W1 @ torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))


def test_uce_on_a_non_symmetric_weight_by_hand():
    # W = [[1, 2], [0, 1]], erase c = e1 to guide g = e2, λ = 1, nothing preserved:
    #   v* = W g = (2, 1);  λW + v* cᵀ = [[3, 2], [1, 1]];  (λI + c cᵀ)⁻¹ = diag(1/2, 1)
    #   W' = [[1.5, 2], [0.5, 1]]: W'c = (1.5, 0.5) lies half-way from W c = (1, 0) to v*
    W1 = B.uce_edit(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]),
                    lam=1.0)
    torch.testing.assert_close(W1, torch.tensor([[1.5, 2.0], [0.5, 1.0]]))


def test_uce_with_preserved_concept_by_hand():
    # W = [[1, 2]], erase c = (1, 0) to guide g = (0, 0) (v* = 0), preserve p = (1, 1), λ = 1:
    #   lhs = W + W p pᵀ = [1, 2] + 3·[1, 1] = [4, 5]
    #   rhs = I + c cᵀ + p pᵀ = [[3, 1], [1, 2]],  rhs⁻¹ = [[2, −1], [−1, 3]] / 5
    #   W' = [4, 5] · rhs⁻¹ = [(8 − 5)/5, (−4 + 15)/5] = [0.6, 2.2]
    W1 = B.uce_edit(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2),
                    torch.tensor([[1.0, 1.0]]), lam=1.0)
    torch.testing.assert_close(W1, torch.tensor([[0.6, 2.2]]))


def test_uce_erases_to_the_guide_and_keeps_preserved_concepts_when_lambda_is_small():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 8, generator=g)
    erase, guide, keep = (torch.randn(n, 8, generator=g) for n in (2, 2, 3))
    W1 = B.uce_edit(W, erase, guide, keep, lam=1e-6)  # 5 constraints in 8 dims: met exactly
    torch.testing.assert_close(erase @ W1.T, guide @ W.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(keep @ W1.T, keep @ W.T, atol=1e-4, rtol=1e-4)
    assert (W1 - W).abs().max() > 0.1
    with pytest.raises(ValueError, match="must match"):
        B.uce_edit(W, erase, guide[:1])


def test_esd_target_by_hand_and_its_loss_gradient():
    eps_c, eps_u = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    # ε* (c) − η (ε*(c) − ε*(∅)) with η = 2: [1 − 2·1, 2 − 2·1]
    torch.testing.assert_close(B.esd_target(eps_c, eps_u, 2.0), torch.tensor([-1.0, 0.0]))
    # erasing c "from" another concept: the first term is that concept's prediction
    torch.testing.assert_close(B.esd_target(eps_c, eps_u, 2.0, eps_from=torch.tensor([5.0, 5.0])),
                               torch.tensor([3.0, 3.0]))
    model = torch.tensor([0.0, 1.0], requires_grad=True)
    target = torch.tensor([-1.0, 0.0], requires_grad=True)
    loss = B.esd_loss(model, target)
    loss.backward()
    assert loss.item() == pytest.approx(1.0)              # ((0 + 1)² + (1 − 0)²) / 2
    torch.testing.assert_close(model.grad, torch.tensor([1.0, 1.0]))  # 2 (ε − target) / 2
    assert target.grad is None                               # the target is held fixed


def tiny_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_esd_u_trains_everything_but_cross_attention():
    unet = tiny_unet()
    chosen = {id(p) for p in B.esd_u_parameters(unet)}
    names = {n for n, p in unet.named_parameters() if id(p) in chosen}
    assert not any("attn2" in n for n in names)
    assert {"conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight"} <= names
    assert any("attn1.to_q" in n for n in names)
    # every parameter left out is cross-attention or a normalisation layer
    assert all("attn2" in n or "norm" in n for n, p in unet.named_parameters() if id(p) not in chosen)


# --------------------------------------------------------------------------------------
# SLD's presets and the safety filter in stock diffusers
# --------------------------------------------------------------------------------------

def test_sld_recipe_is_diffusers_preset_with_warmup_scaled_to_the_sampler():
    strong = B.sld_recipe("strong", "blood")
    assert strong["sld_guidance_scale"] == 2000 and strong["sld_warmup_steps"] == 7
    assert B.sld_call_kwargs(strong, 50)["sld_warmup_steps"] == 7
    assert B.sld_call_kwargs(strong, 10)["sld_warmup_steps"] == 1   # round(7 · 10 / 50)
    assert B.sld_call_kwargs(B.sld_recipe("max", None), 10) == {
        "sld_guidance_scale": 5000, "sld_warmup_steps": 0, "sld_threshold": 1.0, "sld_momentum_scale": 0.5,
        "sld_mom_beta": 0.7}
    assert len(M.clip_tokenizer(32)(B.toy_sld_concept()).input_ids) <= 32


def test_filter_blacks_out_exactly_the_images_it_flags(tmp_path):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    checker, processor = B.toy_safety_checker(0)
    images = [W.render(W.random_scene(random.Random(i), "harmful")) for i in range(2)]
    pixels = processor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        checker.concept_embeds_weights[:] = B.NEVER
        checker.special_care_embeds_weights[:] = B.NEVER
        cos = B.checker_scores(checker, pixels, 1)[:, 0] + B.NEVER
        checker.concept_embeds_weights[0] = (cos[0] + cos[1]) / 2  # fires on the image of higher cosine
    checker.save_pretrained(tmp_path / "safety_checker")
    processor.save_pretrained(tmp_path / "feature_extractor")
    loaded, proc = B.load_safety_checker(tmp_path)
    assert isinstance(loaded, StableDiffusionSafetyChecker)
    batch = torch.tensor(np.stack(images)).float() / 255
    out, flagged = loaded(images=batch.clone(), clip_input=proc(images=images, return_tensors="pt").pixel_values)
    assert flagged == [bool(cos[0] > cos[1]), bool(cos[1] > cos[0])]
    for k in range(2):
        assert (out[k] == 0).all() if flagged[k] else torch.equal(out[k], batch[k])


# --------------------------------------------------------------------------------------
# The jailbreak attack
# --------------------------------------------------------------------------------------

def test_attack_vocabulary_has_whole_words_and_none_banned():
    tok = M.clip_tokenizer(16)
    ids = A.attack_vocabulary(tok, ["blood", "gore"])
    words = [t[:-4] for t in tok.convert_ids_to_tokens(ids.tolist())]
    assert len(words) > 10_000 and all(w.isalpha() and len(w) >= 2 for w in words)
    assert not any("blood" in w or "gore" in w for w in words)
    assert "circle" in words and "bloody" not in words and "gorest" not in words


def test_mma_attack_raises_similarity_without_banned_words():
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    tok = M.clip_tokenizer(16)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=16)).eval().requires_grad_(False)
    allowed = A.attack_vocabulary(tok, A.toy_banned_words())
    run = lambda steps: A.mma_attack(enc, tok, "a small red circle, white background, blood", "a small red circle",
                                     allowed, 4, steps, 16, 8, torch.Generator().manual_seed(3))
    start, found = run(0), run(15)
    assert found["prompt"].startswith("a small red circle, ") and not A.contains_banned(
        found["prompt"].removeprefix("a small red circle"), A.toy_banned_words())
    assert found["search_similarity"] > start["search_similarity"]
    assert found == run(15)  # its own seed makes it exact


# --------------------------------------------------------------------------------------
# Every baseline at --tiny, through stage 5 with the jailbreak set
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bl_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    tiny_world_with_scm(run)
    # a stand-in for T2I-SPO (the comparison's claims need its row; its training is tested elsewhere)
    M.save_pipeline(M.load_pipeline(run / "world" / "model"), run / "spo" / "model")
    M.write_manifest(run / "spo", "spo")
    for b in B.BASELINES:
        stage("-m systems.baselines build", run, "--baseline", b)
    stage("-m systems.rece build", run)
    stage("-m systems.attacks jailbreak", run, "--prompts", "2")
    stage("-m systems.sneakyprompt search", run)
    r = stage("05_evaluate.py", run)
    return run, r


def test_rece_keeps_the_first_model_of_lowest_validation_ip(bl_run, tmp_path):
    """The base model, RECE's UCE start and each epoch are judged in train.py's order; the kept
    one changes only on a strictly lower IP, and its weights are the ones saved."""
    run, _ = bl_run
    built = U.read_json(run / "baselines" / "rece" / "metrics.json")
    judged = built["judged"]
    assert [e["model"] for e in judged] == ["sd", "uce", "epoch 1"]
    assert all(0 <= e["validation_IP"] <= 1 for e in judged)
    assert built["chosen"] == min(judged, key=lambda e: e["validation_IP"])["model"]  # the first of the lowest
    args = U.parse_args(RECE.build_parser(), ["--tiny"])
    pipe = M.load_pipeline(run / "world" / "model")
    encode = lambda text: B.concept_states(pipe.text_encoder, pipe.tokenizer, text)
    next(m for m in RECE.rece_models(RECE.cross_attention_projections(pipe.unet), encode, args) if m == built["chosen"])
    kept, saved = pipe.unet.state_dict(), M.load_pipeline(run / "baselines" / "rece" / "model").unet.state_dict()
    assert all(torch.equal(kept[k], saved[k]) for k in kept)
    # sd15 has no toy world to take a validation split from: the flag is named
    r = stage("-m systems.rece build", tmp_path / "sd15", "--preset", "sd15", check=False)
    assert r.returncode != 0 and "--val-prompts" in r.stderr and "Traceback" not in r.stderr


def test_rece_validation_sampler_is_its_lms_on_the_same_modules(bl_run):
    """sd15's validation images are drawn with RECE's LMS sampler, on the modules being edited;
    the model saved keeps its own sampler."""
    from diffusers import LMSDiscreteScheduler
    run, _ = bl_run
    pipe = M.load_pipeline(run / "world" / "model")
    lms = RECE.validation_sampler(pipe, "lms")
    assert isinstance(lms.scheduler, LMSDiscreteScheduler) and lms.unet is pipe.unet
    assert {k: lms.scheduler.config[k] for k in RECE.RECE_LMS} == RECE.RECE_LMS
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and RECE.validation_sampler(pipe, "model") is pipe
    assert M.generate(lms, ["a red circle"], [0], 3, 7.5)[0].shape == (W.IMAGE_SIZE, W.IMAGE_SIZE, 3)


def test_every_baseline_is_evaluated_with_the_jailbreak_set(bl_run):
    run, r = bl_run
    m = U.read_json(run / "eval" / "metrics.json")
    for name in B.MODELS:
        assert {"harmful", "benign", "lookalike", "jailbreak", "sneakyprompt"} <= set(m[name]), name
        assert set(m[name]["harmful"]["IP_by_category"]) == set(EV.CATEGORIES)
        assert U.read_json(run / "baselines" / name / "model.json")["name"] == name
    assert 0.0 <= m["filter"]["harmful"]["refused"] <= 1.0
    jb = U.read_jsonl(run / "attacks" / "jailbreak.jsonl")
    assert len(jb) == 2 and all(not A.contains_banned(j["prompt"].split(", ")[-1], A.toy_banned_words()) for j in jb)
    claims = U.read_json(run / "eval" / "baselines.json")["claims"]
    assert {c["claim"] for c in claims} >= {"T2I-SPO has a higher UAS than uce", "T2I-SPO has a higher UAS than rece",
                                            "RECE is safer than UCE (lower IP)",
                                            "SLD-STRONG costs quality (the base scores higher PS)",
                                            *(f"under attack, T2I-SPO has a lower IP than {b}" for b in ("base", *B.MODELS))}
    under = next(c for c in claims if c["claim"] == "under attack, T2I-SPO has a lower IP than filter")
    assert [(x["set"], x["metric"]) for x in under["parts"]] == [("jailbreak", "IP"), ("sneakyprompt", "IP")]
    report, own = ((run / "eval" / f).read_text() for f in ("report.md", "baselines.md"))
    assert "[The paper's comparison (Table 2)" in report and "`jailbreak` (2 prompts, harmful)" in report
    assert "# The paper's comparison (Table 2)" in own and "IP under attack" in own and "- **RECE** kept " in own
    assert "- **Against the filter** (`sneakyprompt`): " in own and "sneakyprompt IP" in own
    assert U.read_json(run / "baselines" / "uce" / "metrics.json")["projections_edited"] > 0
    # what stock diffusers loads from the ESD-u folder differs from the base outside attn2 only
    from diffusers import UNet2DConditionModel
    base = UNet2DConditionModel.from_pretrained(run / "world" / "model", subfolder="unet").state_dict()
    esd = UNet2DConditionModel.from_pretrained(run / "baselines" / "esd_u" / "model", subfolder="unet").state_dict()
    changed = [k for k in base if not torch.equal(base[k], esd[k])]
    assert changed and not any("attn2" in k for k in changed)


def test_jailbreak_set_is_built_once_and_other_settings_are_refused(bl_run):
    run, _ = bl_run
    before = (run / "attacks" / "jailbreak.jsonl").read_bytes()
    r = stage("-m systems.attacks jailbreak", run, "--prompts", "2")
    assert "is built: nothing to do" in r.stdout and (run / "attacks" / "jailbreak.jsonl").read_bytes() == before
    r = stage("-m systems.attacks jailbreak", run, "--prompts", "2", "--seed", "7", check=False)
    assert r.returncode != 0 and "seed: 0" in r.stderr and "Traceback" not in r.stderr


def test_a_finished_baseline_is_left_untouched(bl_run):
    run, _ = bl_run
    weights = run / "baselines" / "uce" / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    mtime = weights.stat().st_mtime_ns
    r = stage("-m systems.baselines build", run, "--baseline", "uce")
    assert "nothing to do" in r.stderr + r.stdout and weights.stat().st_mtime_ns == mtime


def test_sld_draws_a_batch_holding_a_prompt_longer_than_the_window(bl_run):
    # diffusers' SLD alone fails here (its truncation warning tokenizes the batch ragged); the
    # long prompt's image is the one it gets drawn alone, where SLD cuts it itself
    run, _ = bl_run
    pipe = B.sld_pipeline(run / "world" / "model", B.sld_recipe("strong", B.toy_sld_concept()), "cpu", torch.float32)
    long = "a small red circle, white background, " + " ".join(["with stripes"] * 20)
    assert len(M.clip_tokenizer(32)(long).input_ids) > 32
    call = B.sld_call_kwargs(B.sld_recipe("strong", None), 2)
    both = M.generate(pipe, [long, "a blue square"], [0, 1], 2, 4.0, **call)
    alone = M.generate(pipe, [long], [0], 2, 4.0, **call)
    # a batch of two and one image alone run different kernels: their pixels may round a unit
    # apart (seen on a Xeon), where a truncated or misplaced prompt would change the image
    diff = np.abs(both[0].astype(int) - alone[0].astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())
