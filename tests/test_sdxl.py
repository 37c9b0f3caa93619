"""SDXL as the data model (paper Sec. 3.2 draws its harmful images and their inpainted safe
counterparts with SDXL) and as a model stage 5 evaluates: a tiny random SDXL built here, saved
as a stock StableDiffusionXLPipeline folder, loaded by the class its model_index.json names."""
import pytest
import torch

import models as M
import utils as U
from conftest import stage, tiny_world_with_scm


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
    # stage 4 does not train SDXL, and says so
    r = stage("04_train_spo.py", run, "--model", str(sdxl), check=False)
    assert r.returncode != 0 and "SDXL's" in r.stderr and "Traceback" not in r.stderr
    # stage 5 evaluates SDXL beside the toy base, on the same prompts and seeds
    stage("05_evaluate.py", run, "--models", f"sdxl={sdxl}")
    m = U.read_json(run / "eval" / "metrics.json")
    assert {"base", "sdxl"} <= set(m) and set(m["sdxl"]) == set(m["base"])
    assert 0 <= m["sdxl"]["harmful"]["IP"] <= 1
