"""SDXL as the data model (paper Sec. 3.2 draws its harmful images and their inpainted safe
counterparts with SDXL), as the model stage 4 aligns (Appendix E) and as a model stage 5
evaluates: a tiny random SDXL built here, saved as a stock StableDiffusionXLPipeline folder,
loaded by the class its model_index.json names."""
import shutil

import numpy as np
import pytest
import torch

from lib import models as M
from lib import utils as U
from conftest import module, stage, tiny_world_with_scm


def save_tiny_sdxl(folder):
    """SDXL's architecture at toy size (diffusers' own test configuration): two CLIP text
    encoders whose 32-d states concatenate to the UNet's 64-d cross-attention, the second's
    32-d pooled projection and six 8-d time ids in the `text_time` added embedding (80 = 32 + 48);
    32-pixel images."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64)
    vae = AutoencoderKL(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, sample_size=32, norm_num_groups=16)
    text = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text), text_encoder_2=CLIPTextModelWithProjection(text),
                              tokenizer=M.clip_tokenizer(77), tokenizer_2=M.clip_tokenizer(77), unet=unet,
                              scheduler=scheduler).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "model")


def test_load_pipeline_takes_the_class_model_index_names(sdxl):
    from diffusers import StableDiffusionXLPipeline
    pipe = M.load_pipeline(sdxl)
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.text_encoder_2 is not None
    both = M.generate(pipe, ["a red circle", "a blue square"], [0, 1], 2, 4.0)
    alone = M.generate(pipe, ["a blue square"], [1], 2, 4.0)
    assert both[0].shape == (32, 32, 3) and (both[1] == alone[0]).all()  # each image its own generator
    assert not (both[0] == both[1]).all()
    # the filter baseline needs a pipeline with a safety checker: SDXL's has none
    with pytest.raises(SystemExit, match="StableDiffusionXLPipeline has no safety checker"):
        M.load_pipeline(sdxl, safety_checker=("checker", "extractor"))


def test_stages_1_3_and_5_draw_with_sdxl(sdxl, tmp_path):
    run = tiny_world_with_scm(tmp_path / "run")
    base = run / "world" / "model"
    # stage 1 with two data models, the toy base and SDXL: each draws its share of the images
    stage("01_build_coarse.py", run, "--models", str(base), str(sdxl))
    drawn = [r for f in sorted((run / "coarse" / "images").glob("manifest-*.jsonl")) for r in U.read_jsonl(f)]
    assert {r["model"] for r in drawn} == {str(base), str(sdxl)}
    assert all(U.load_png(run / "coarse" / r["path"]).shape == (32, 32, 3) for r in drawn)
    # stage 3: SDXL as the img2img model of the safe sides, then as the whole data model
    stage("03_build_hf.py", run, "--img2img-model", str(sdxl))
    stage("03_build_hf.py", run, "--model", str(sdxl), "--name", "hf_sdxl")
    for name in ("hf", "hf_sdxl"):
        cfg = U.read_json(run / name / "config.json")
        assert U.read_jsonl(run / name / "hf_pairs.jsonl") and str(sdxl) in (cfg["img2img_model"], cfg["model"])
    # stage 5 evaluates SDXL beside the toy base, on the same prompts and seeds
    stage("05_evaluate.py", run, "--models", f"sdxl={sdxl}")
    m = U.read_json(run / "eval" / "metrics.json")
    assert {"base", "sdxl"} <= set(m) and set(m["sdxl"]) == set(m["base"])
    assert 0 <= m["sdxl"]["harmful"]["IP"] <= 1


# --------------------------------------------------------------------------------------
# Stage 4 on SDXL: both encoders, the pooled embedding and the time ids, packed and cached
# --------------------------------------------------------------------------------------

def test_packed_conditioning_is_sdxl_pipelines_own(sdxl):
    # PromptEncoder + XLConditioned give the UNet what StableDiffusionXLPipeline gives it
    pipe = M.load_pipeline(sdxl)
    emb = M.PromptEncoder(sdxl, "cpu", "text_time")(["a red circle", "a blue square"], 32)
    states, _, pooled, _ = pipe.encode_prompt(["a red circle", "a blue square"], do_classifier_free_guidance=False)
    assert emb.shape == (2, 78, 64) and torch.allclose(emb[:, :-1], states) and torch.allclose(emb[:, -1, :32], pooled)
    assert emb[:, -1, 32:38].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2 and (emb[:, -1, 38:] == 0).all()
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        ours = M.XLConditioned(pipe.unet)(x, t, emb).sample
        theirs = pipe.unet(x, t, states, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)}).sample
    assert torch.allclose(ours, theirs)


@pytest.fixture(scope="module")
def xl_run(sdxl, tmp_path_factory):
    run = tiny_world_with_scm(tmp_path_factory.mktemp("xl") / "run")
    stage("03_build_hf.py", run, "--model", str(sdxl))  # SDXL draws the pairs, as the paper's data model
    stage("04_train_spo.py", run, "--model", str(sdxl))
    return run


def unet_weights(folder):
    from safetensors.torch import load_file
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def moved(sdxl, model) -> float:
    """How far training moved the model's UNet from the base's (the largest change)."""
    base, w = unet_weights(sdxl), unet_weights(model)
    return max((w[k] - base[k]).abs().max().item() for k in base)


def test_stage4_trains_sdxl_into_a_stock_pipeline(sdxl, xl_run):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file
    assert isinstance(M.load_pipeline(xl_run / "spo" / "model"), StableDiffusionXLPipeline)
    assert moved(sdxl, xl_run / "spo" / "model") > 0
    log = U.read_jsonl(xl_run / "spo" / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 9)) and all(np.isfinite(r["loss"]) for r in log)
    text, = (xl_run / "spo" / "cache").glob("*/text-00000.safetensors")
    cached = load_file(text)["x"]
    assert cached.shape[1:] == (78, 64) and (cached[:, -1, 32:38] == torch.tensor([32.0, 32, 0, 0, 32, 32])).all()


def test_sdxl_resume_is_exact_and_two_processes_match_one(sdxl, xl_run, tmp_path, torchrun):
    run = tmp_path / "run"
    shutil.copytree(xl_run, run, ignore=shutil.ignore_patterns("spo"))
    r = stage("04_train_spo.py", run, "--model", str(sdxl), "--stop-after", "4", check=False)
    assert r.returncode != 0 and "stopped after 4" in r.stderr
    stage("04_train_spo.py", run, "--model", str(sdxl))
    a, b = unet_weights(xl_run / "spo" / "model"), unet_weights(run / "spo" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # two processes take the same steps: the same loss and pre-clipping gradient norm at each
    # (not the weights: on a random UNet many gradients are float noise, and Adam's first steps
    # move each such weight by ±lr whatever the noise's size)
    torchrun("04_train_spo.py", run, "--model", str(sdxl), "--name", "spo2")
    one, two = (U.read_jsonl(d / "log.jsonl") for d in (xl_run / "spo", run / "spo2"))
    assert len(one) == len(two) == 8 and U.read_json(run / "spo2" / "metrics.json")["world_size"] == 2
    for x, y in zip(one, two):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_sdxl_lora_loads_with_load_lora_weights_and_fuses(sdxl, xl_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(xl_run, run, ignore=shutil.ignore_patterns("spo"))
    stage("04_train_spo.py", run, "--model", str(sdxl), "--lora-rank", "2", "--name", "lora")
    base = M.load_pipeline(sdxl)
    base.load_lora_weights(run / "lora" / "lora")  # stock diffusers, onto the base model
    fused = M.load_pipeline(run / "lora" / "model")
    x, y = (M.generate(p, ["a large blue circle, extreme gore"], [0], 2, 4.0)[0].astype(int) for p in (base, fused))
    assert np.abs(x - y).max() <= 2
    assert moved(sdxl, run / "lora" / "model") > 0


def test_sdxl_preset_is_sd15s_on_sdxl():
    module("04_train_spo.py")  # registers stage 4's presets
    xl, sd = U.preset_defaults("sdxl", "spo", False), U.preset_defaults("sd15", "spo", False)
    assert xl.pop("model") == "stabilityai/stable-diffusion-xl-base-1.0" and sd.pop("model") != xl.get("model")
    assert xl == sd and xl["bf16"] and xl["grad_checkpointing"]
    module("01_build_coarse.py")  # a stage sdxl gives nothing of its own takes sd15's values
    assert U.preset_defaults("sdxl", "coarse", False) == U.preset_defaults("sd15", "coarse", False) != {}


def test_toy_world_with_sdxls_architecture(tmp_path):
    # stage 0 --arch sdxl (make sdxl's base model): trained through the packed conditioning,
    # saved as a stock SDXL pipeline whose empty prompt is encoded, as trained, not zeroed
    from diffusers import StableDiffusionXLPipeline
    stage("00_toy_world.py", tmp_path, "--arch", "sdxl", "--eval-per-set", "2")
    pipe = M.load_pipeline(tmp_path / "world" / "model")
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.unet.config.addition_embed_type == "text_time"
    assert not pipe.config.force_zeros_for_empty_prompt and pipe.unet.config.cross_attention_dim == 64
    assert pipe.text_encoder.config.hidden_size == pipe.text_encoder_2.config.hidden_size == 32
    m = U.read_json(tmp_path / "world" / "metrics.json")
    assert 0 <= m["harmful_rate_on_lookalike"] <= 1 and m["judge_agreement"] > 0.5
