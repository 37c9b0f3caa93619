"""lib/quality_metrics.py: AES on its published weights, HPSv2 and ImageReward on state dicts that
carry their published checkpoints' key names at a small width (every key must load), the
missing-weights messages, FID by hand on the toy's features, and FID on COCO against clean-fid's
own functions, on a tiny TorchScript network in the layout of clean-fid's Inception."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lib import quality_metrics as Q
from lib import toyworld as W
from lib import utils as U

FIXTURES = Path(__file__).resolve().parent / "fixtures"
AES_FILE = FIXTURES / "aes" / "sac+logos+ava1-l14-linearMSE.pth"


def drawn(n, seed=0, kind="benign"):
    rng = random.Random(seed)
    scenes = [W.random_scene(rng, kind) for _ in range(n)]
    return [W.render(s) for s in scenes], [W.scene_to_prompt(s) for s in scenes]


def random_state(shapes: dict[str, tuple], seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.arange(s[-1]).expand(*s).clone() if k.endswith("position_ids")
                else 0.05 * torch.randn(s, generator=g)) for k, s in shapes.items()}


# ---------------------------------------------------------------------------------------
# AES: the published file itself
# ---------------------------------------------------------------------------------------

def collapsed(state):
    """The head in eval mode is one affine map: W = W_7 W_6 W_4 W_2 W_0, b likewise."""
    w, b = state["layers.0.weight"], state["layers.0.bias"]
    for i in (2, 4, 6, 7):
        w, b = state[f"layers.{i}.weight"] @ w, state[f"layers.{i}.weight"] @ b + state[f"layers.{i}.bias"]
    return w, b


def test_aes_head_loads_the_published_file_and_is_one_affine_map():
    state = Q.load_weights(AES_FILE, "--aes-model")
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,), "layers.6.weight": (16, 64),
        "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,)}
    head = Q.reward_head(state)
    Q.load_exactly(torch.nn.ModuleDict({"layers": head}), state, "aes")
    head.eval()
    e = torch.nn.functional.normalize(torch.randn(200, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    w, b = collapsed(state)
    with torch.no_grad():
        y = head(e).squeeze(-1)
    assert torch.allclose(y, (e @ w.T + b).squeeze(-1), atol=1e-4)
    assert b.item() == pytest.approx(5.2366, abs=1e-4)  # a unit embedding scores 5.24 ± 18·cos(e, W)
    assert 2.5 < y.min() and y.max() < 8  # on the 1-10 rating scale


def test_aes_scores_the_clip_embedding_through_the_head(tiny_clip, tmp_path):
    images, _ = drawn(3)
    shapes = {"layers.0.weight": (32, 16), "layers.0.bias": (32,), "layers.2.weight": (8, 32), "layers.2.bias": (8,),
              "layers.4.weight": (8, 8), "layers.4.bias": (8,), "layers.6.weight": (4, 8), "layers.6.bias": (4,),
              "layers.7.weight": (1, 4), "layers.7.bias": (1,)}
    state = random_state(shapes)
    torch.save(state, tmp_path / "aes.pth")
    aes = Q.Aesthetic(str(tmp_path / "aes.pth"), str(tiny_clip))
    emb, _ = aes.clip.unit_embeddings(images)
    w, b = collapsed(state)
    assert aes(images) == pytest.approx((emb @ w.T + b).squeeze(-1).tolist(), abs=1e-5)
    with pytest.raises(U.DataError, match="reads 768-d embeddings"):  # the published head on a 16-d CLIP
        Q.Aesthetic(str(AES_FILE), str(tiny_clip))


def test_missing_weights_name_the_file_and_where_it_is_published(tmp_path):
    with pytest.raises(SystemExit, match="huggingface.co/xswu/HPSv2"):
        Q.published_file("xswu/HPSv2/HPS_v2.1_compressed.pt", "--hps-model")
    with pytest.raises(SystemExit, match="--imagereward-model nowhere.pt: weights file not found"):
        Q.published_file("nowhere.pt", "--imagereward-model")
    with pytest.raises(SystemExit, match="stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"):
        Q.inception_file(str(tmp_path / "inception-2015-12-05.pt"))
    (tmp_path / "inception.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="by the name inception-2015-12-05.pt; rename the file"):
        Q.inception_file(str(tmp_path / "inception.pt"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    import pickle
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Path("x")}, f)  # a global other than a tensor's
    with pytest.raises(U.DataError, match="not a checkpoint of tensors, refused"):
        Q.load_weights(path, "--hps-model")


# ---------------------------------------------------------------------------------------
# HPSv2: OpenCLIP's ViT-H-14 layout at a small width
# ---------------------------------------------------------------------------------------

TINY_OPENCLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                                                  "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 2}}


def hps_published_shapes(cfg) -> dict[str, tuple]:
    """The keys of the HPS checkpoints' state_dict (OpenCLIP's CLIP, as hpsv2 builds it for
    ViT-H-14: 686 keys), written out from that layout for any size."""
    v, t, d = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    vw, tw, grid = v["width"], t["width"], v["image_size"] // v["patch_size"]
    shapes = {"positional_embedding": (t["context_length"], tw), "text_projection": (tw, d), "logit_scale": (),
              "visual.class_embedding": (vw,), "visual.positional_embedding": (grid * grid + 1, vw),
              "visual.proj": (vw, d), "visual.conv1.weight": (vw, 3, v["patch_size"], v["patch_size"]),
              "visual.ln_pre.weight": (vw,), "visual.ln_pre.bias": (vw,), "visual.ln_post.weight": (vw,),
              "visual.ln_post.bias": (vw,), "token_embedding.weight": (t["vocab_size"], tw),
              "ln_final.weight": (tw,), "ln_final.bias": (tw,)}
    for prefix, width, layers in (("visual.transformer", vw, v["layers"]), ("transformer", tw, t["layers"])):
        for i in range(layers):
            b = f"{prefix}.resblocks.{i}."
            shapes.update({b + "ln_1.weight": (width,), b + "ln_1.bias": (width,),
                           b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
                           b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
                           b + "ln_2.weight": (width,), b + "ln_2.bias": (width,),
                           b + "mlp.c_fc.weight": (4 * width, width), b + "mlp.c_fc.bias": (4 * width,),
                           b + "mlp.c_proj.weight": (width, 4 * width), b + "mlp.c_proj.bias": (width,)})
    return shapes


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hps")
    (folder / "tiny-hps-ViT.json").write_text(json.dumps(TINY_OPENCLIP))
    torch.save({"state_dict": random_state(hps_published_shapes(TINY_OPENCLIP))}, folder / "HPS_tiny.pt")
    return folder


def test_hps_checkpoint_layout_is_the_published_one():
    real = json.loads((Path(__import__("open_clip").__file__).parent / "model_configs" / "ViT-H-14.json").read_text())
    assert len(hps_published_shapes(real)) == 686  # as counted on hpsv2's own ViT-H-14


def test_hps_loads_every_key_and_scores_the_cosine_times_100(tiny_hps):
    hps = Q.HPSv2(str(tiny_hps / "HPS_tiny.pt"), str(tiny_hps / "tiny-hps-ViT.json"), "v2.1")
    images, prompts = drawn(3)
    scores = hps(images, prompts)
    # by hand: the unit image and text features of the same towers, dotted, × 100 (hpsv2's
    # evaluation.py: image_features @ text_features.T * 100)
    x = torch.stack([hps.transform(__import__("PIL").Image.fromarray(im)) for im in images])
    with torch.no_grad():
        f = hps.model.encode_image(x)
        g = hps.model.encode_text(hps.tokenizer(prompts))
    expected = 100 * (f / f.norm(dim=-1, keepdim=True) * (g / g.norm(dim=-1, keepdim=True))).sum(-1)
    assert scores == pytest.approx(expected.tolist(), abs=1e-3) and all(-100 <= s <= 100 for s in scores)
    # hpsv2 letterboxes a non-square image: a 32x16 image keeps its rows, padded black above and below
    wide = hps.transform(__import__("PIL").Image.fromarray(np.full((16, 32, 3), 255, np.uint8)))
    black = (torch.zeros(3) - torch.tensor(Q.OPENAI_MEAN)) / torch.tensor(Q.OPENAI_STD)
    assert torch.allclose(wide[:, 0, 0], black, atol=1e-5) and torch.allclose(wide[:, 16, 16], (1 - torch.tensor(
        Q.OPENAI_MEAN)) / torch.tensor(Q.OPENAI_STD), atol=1e-4)


def test_hps_label_names_the_checkpoints_version(tiny_hps, tmp_path):
    arch = str(tiny_hps / "tiny-hps-ViT.json")
    for name, version in (("HPS_v2_compressed.pt", "v2.0"), ("HPS_v2.1_compressed.pt", "v2.1")):
        (tmp_path / name).write_bytes((tiny_hps / "HPS_tiny.pt").read_bytes())
        assert Q.HPSv2(str(tmp_path / name), arch).label == f"HPS{version} × 100"  # read off the file name
    assert Q.HPSv2(str(tmp_path / "HPS_v2_compressed.pt"), arch, "v2.1").label == "HPSv2.1 × 100"  # the flag wins
    with pytest.raises(SystemExit, match=r"its version is unknown: name it with --hps-version v2\.0\|v2\.1"):
        Q.HPSv2(str(tiny_hps / "HPS_tiny.pt"), arch)


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("visual.ln_post.bias"), "1 missing keys (visual.ln_post.bias)"),
    (lambda sd: sd.__setitem__("module.logit_bias", torch.zeros(1)), "1 unexpected keys (module.logit_bias)"),
    (lambda sd: sd.__setitem__("visual.proj", torch.zeros(64, 8)), "visual.proj (64, 8) (expected (64, 16))"),
])
def test_hps_checkpoint_that_does_not_fit_is_named(tiny_hps, tmp_path, change, message):
    state = torch.load(tiny_hps / "HPS_tiny.pt", weights_only=True)["state_dict"]
    change(state)
    torch.save({"state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(U.DataError, match="does not fit the architecture") as e:
        Q.HPSv2(str(tmp_path / "bad.pt"), str(tiny_hps / "tiny-hps-ViT.json"), "v2.1")
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------
# ImageReward: BLIP's layout at a small width
# ---------------------------------------------------------------------------------------

def imagereward_published_shapes(vw=1024, v_layers=24, patch=16, image=224, tw=768, t_layers=12, vocab=30524,
                                 max_pos=512, t_mlp=3072) -> dict[str, tuple]:
    """ImageReward.pt's keys as its BLIP code names them (ViT: cls_token, blocks.i.attn.qkv, ...;
    BERT with cross-attention in every layer; BLIP's two projections; the head mlp.layers.*)."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    s = {v + "cls_token": (1, 1, vw), v + "pos_embed": (1, (image // patch) ** 2 + 1, vw),
         v + "patch_embed.proj.weight": (vw, 3, patch, patch), v + "patch_embed.proj.bias": (vw,),
         v + "norm.weight": (vw,), v + "norm.bias": (vw,)}
    for i in range(v_layers):
        b = f"{v}blocks.{i}."
        s.update({b + "norm1.weight": (vw,), b + "norm1.bias": (vw,), b + "attn.qkv.weight": (3 * vw, vw),
                  b + "attn.qkv.bias": (3 * vw,), b + "attn.proj.weight": (vw, vw), b + "attn.proj.bias": (vw,),
                  b + "norm2.weight": (vw,), b + "norm2.bias": (vw,), b + "mlp.fc1.weight": (4 * vw, vw),
                  b + "mlp.fc1.bias": (4 * vw,), b + "mlp.fc2.weight": (vw, 4 * vw), b + "mlp.fc2.bias": (vw,)})
    s.update({t + "embeddings.position_ids": (1, max_pos), t + "embeddings.word_embeddings.weight": (vocab, tw),
              t + "embeddings.position_embeddings.weight": (max_pos, tw), t + "embeddings.LayerNorm.weight": (tw,),
              t + "embeddings.LayerNorm.bias": (tw,)})
    for i in range(t_layers):
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", tw), ("crossattention", vw)):
            s.update({f"{b}{att}.self.query.weight": (tw, tw), f"{b}{att}.self.query.bias": (tw,),
                      f"{b}{att}.self.key.weight": (tw, kv), f"{b}{att}.self.key.bias": (tw,),
                      f"{b}{att}.self.value.weight": (tw, kv), f"{b}{att}.self.value.bias": (tw,),
                      f"{b}{att}.output.dense.weight": (tw, tw), f"{b}{att}.output.dense.bias": (tw,),
                      f"{b}{att}.output.LayerNorm.weight": (tw,), f"{b}{att}.output.LayerNorm.bias": (tw,)})
        s.update({b + "intermediate.dense.weight": (t_mlp, tw), b + "intermediate.dense.bias": (t_mlp,),
                  b + "output.dense.weight": (tw, t_mlp), b + "output.dense.bias": (tw,),
                  b + "output.LayerNorm.weight": (tw,), b + "output.LayerNorm.bias": (tw,)})
    s.update({"blip.vision_proj.weight": (256, vw), "blip.vision_proj.bias": (256,), "blip.text_proj.weight": (256, tw),
              "blip.text_proj.bias": (256,)})
    for i, (o, n) in zip((0, 2, 4, 6, 7), ((1024, tw), (128, 1024), (64, 128), (16, 64), (1, 16))):
        s.update({f"mlp.layers.{i}.weight": (o, n), f"mlp.layers.{i}.bias": (o,)})
    return s


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "small", "large", "red", "green", "blue", "circle",
         "square", "sky", "grey", "background", ",", "with", "stripes"]


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    from transformers import BertTokenizer
    folder = tmp_path_factory.mktemp("imagereward")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder / "tokenizer")
    shapes = imagereward_published_shapes(vw=128, v_layers=2, patch=8, image=32, tw=64, t_layers=2,
                                          vocab=len(WORDS) + 2, max_pos=40, t_mlp=128)
    torch.save(random_state(shapes), folder / "ImageReward.pt")
    return folder


def test_imagereward_checkpoint_layout_is_the_published_one():
    shapes = imagereward_published_shapes()
    assert len(shapes) == 625 and sum(int(np.prod(s)) for s in shapes.values()) == 446_666_465


def test_imagereward_loads_every_key_and_normalises_the_reward(tiny_imagereward, tmp_path):
    ir = Q.ImageReward(str(tiny_imagereward / "ImageReward.pt"), str(tiny_imagereward / "tokenizer"))
    vision, text = ir.model.vision.config, ir.model.text.config
    assert (vision.image_size, vision.num_attention_heads, text.num_attention_heads, text.encoder_hidden_size) == \
        (32, 2, 1, 128)
    images, prompts = drawn(2)
    scores = ir(images, prompts)
    assert len(scores) == 2 and all(np.isfinite(scores))
    assert scores[0] != pytest.approx(ir(images[1:], prompts[:1])[0], abs=1e-6)  # the text reads the image
    # a head that ignores its input and outputs b: the score is (b − 0.16717) / 1.03334
    state = torch.load(tiny_imagereward / "ImageReward.pt", weights_only=True)
    state["mlp.layers.7.weight"].zero_()
    state["mlp.layers.7.bias"].fill_(1.2)
    torch.save(state, tmp_path / "flat.pt")
    flat = Q.ImageReward(str(tmp_path / "flat.pt"), str(tiny_imagereward / "tokenizer"))
    assert flat(images, prompts) == pytest.approx([(1.2 - 0.16717362830052426) / 1.0333394966054072] * 2, abs=1e-6)


def test_imagereward_keys_that_do_not_fit_are_named(tiny_imagereward, tmp_path):
    state = torch.load(tiny_imagereward / "ImageReward.pt", weights_only=True)
    state.pop("blip.visual_encoder.blocks.1.attn.qkv.bias")
    state["blip.itm_head.weight"] = torch.zeros(2, 64)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(U.DataError) as e:
        Q.ImageReward(str(tmp_path / "bad.pt"), str(tiny_imagereward / "tokenizer"))
    assert "missing keys (vision.encoder.layers.1.self_attn.qkv.bias)" in str(e.value)
    assert "unexpected keys (blip.itm_head.weight)" in str(e.value)


# ---------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------

def fid_of(features, first, second) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance
    metric = FrechetInceptionDistance(feature=features, antialias=False)
    fid = Q.Fid(["toy"], None)
    fid._update(metric, iter(first), real=True)
    fid._update(metric, iter(second), real=False)
    return float(metric.compute())


def flat(name):
    return np.tile(W.PALETTE_RGB[W.PALETTE_NAMES.index(name)].round().astype(np.uint8), (32, 32, 1))


def test_toy_features_of_a_flat_image_and_a_render():
    f = W.toy_features(flat("bg:sky"))
    assert f.shape == (W.TOY_FEATURES,) and f[W.PALETTE_NAMES.index("bg:sky")] == 100 and f[:-2].sum() == 100
    assert f[-2] == 0 and f[-1] == pytest.approx(0, abs=0.2)  # no edges, on the palette
    render = W.reference_render("a large red circle, sky background", 0)
    g = W.toy_features(render)
    assert g[W.PALETTE_NAMES.index("object:red")] > 10 and g[-2] > 0


def test_fid_by_hand_on_the_toy_features():
    """Set A: two sky, two sand images (features 100 · one-hot in two dims: mean (50, 50),
    unbiased variances 10⁴/3 and covariance −10⁴/3); set B: four sky (mean (100, 0), no spread).
    FID = ‖μ_A − μ_B‖² + Tr Σ_A + Tr Σ_B − 2 Tr (Σ_A Σ_B)^½ = 5000 + 20000/3 + 0 − 0."""
    a = [flat("bg:sky"), flat("bg:sky"), flat("bg:sand"), flat("bg:sand")]
    b = [flat("bg:sky")] * 4
    assert fid_of(Q.ToyFeatures(), a, b) == pytest.approx(5000 + 20000 / 3, rel=1e-6)
    assert fid_of(Q.ToyFeatures(), a, a) == pytest.approx(0, abs=1e-3)


def test_toy_fid_through_measure_is_unchanged(tmp_path):
    """The toy's FID as Fid.measure computes it, six renders against the world's renders of six
    other prompts: a fixed value (COCO's clean-fid path is another), to 1e-7: CPU kinds round
    its float64 eigenvalues differently (3940.82065863 on the Xeon 207, 3940.82064040 on Zen 3)."""
    rng = random.Random(7)
    scenes = [W.random_scene(rng, "benign") for _ in range(12)]
    items = []
    for k, scene in enumerate(scenes[:6]):
        U.save_png(tmp_path / f"{k}.png", W.render(scenes[6 + k]))
        items.append({"prompt": W.scene_to_prompt(scene), "seed": k, "image": f"{k}.png"})
    fid = Q.Fid(["toy"], None).measure("benign", [], {"base": items}, tmp_path)
    assert fid == {"base": pytest.approx(3940.8206586342694, rel=1e-7)}


class TinyInception(torch.nn.Module):
    """clean-fid's TorchScript Inception in its layout at a tiny size: `layers` maps (x − 128) / 128
    at 299 x 299 to 2,048 pooled features, as the published graph's `layers` does."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                          torch.nn.Conv2d(8, 2048, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


@pytest.fixture(scope="module")
def tiny_inception(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cleanfid") / Q.INCEPTION_FILE
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.jit.script(TinyInception()).save(str(path))
    return path


def test_clean_resize_is_clean_fids_bicubic_on_the_whole_image_unquantised():
    """Against clean-fid's own resizer, and against its formula written out: each channel a float
    image, PIL's bicubic (antialiased) to 299 x 299, clipped to [0, 255], not rounded."""
    from PIL import Image
    from cleanfid.resize import build_resizer
    rng = np.random.default_rng(0)
    for shape in ((37, 53, 3), (299, 299, 3), (480, 640, 3), (512, 512, 3)):
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        y = Q.clean_resize(x)
        by_hand = np.stack([np.asarray(Image.fromarray(x[..., c].astype(np.float32)).resize((299, 299), Image.BICUBIC))
                            for c in range(3)], -1).clip(0, 255)
        assert y.dtype == np.float32 and y.shape == (299, 299, 3)
        assert np.array_equal(y, build_resizer("clean")(x)) and np.array_equal(y, by_hand)
    assert not np.array_equal(y, y.round())
    wide = np.zeros((100, 400, 3), np.uint8)
    wide[:, :100] = 255  # the left quarter is white: no crop keeps it, at the left quarter of 299
    y = Q.clean_resize(wide)
    assert y[:, :70].min() > 250 and y[:, 80:].max() < 5


def test_fid_on_coco_feeds_clean_fids_pipeline_the_same_images(tiny_inception, tmp_path):
    """Fid's features of COCO photographs (whole, any size, a grey one among them) and of generated
    PNGs are those clean-fid's folder pipeline (get_files_features, mode "clean") computes with
    the same network: sums and second moments, as torchmetrics keeps them."""
    from PIL import Image
    from cleanfid.fid import get_files_features
    from cleanfid.inception_torchscript import InceptionV3W
    from torchmetrics.image.fid import FrechetInceptionDistance
    from lib import data as D
    rows, _ = D.load_prompt_set(FIXTURES / "coco" / "rece_coco_30k_cut.csv")
    rows = rows[:4]
    coco, out = tmp_path / "val2014", tmp_path / "out"
    coco.mkdir()
    out.mkdir()
    rng = np.random.default_rng(0)
    for row, shape in zip(rows, ((48, 64, 3), (64, 40, 3), (30, 30, 3), (50, 70))):
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        image.save(coco / f"COCO_val2014_{row['coco_id']:012d}.jpg")
    items = []
    for k in range(5):
        U.save_png(out / f"{k}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        items.append({"image": f"{k}.png"})
    fid = Q.Fid([f"coco={coco}"], str(tiny_inception))
    metric = FrechetInceptionDistance(feature=fid.network, reset_real_features=False)
    fid._update(metric, fid.references("coco", rows, items), real=True)
    fid._update(metric, fid.generated("coco", items, out), real=False)
    theirs = InceptionV3W(str(tiny_inception.parent), download=False)
    references, generated = [Q.coco_image(coco, row) for row in rows], [out / it["image"] for it in items]
    for side, files in (("real", references), ("fake", generated)):
        f = torch.from_numpy(get_files_features([str(p) for p in files], theirs, num_workers=0, batch_size=2,
                                                device=torch.device("cpu"), mode="clean", verbose=False)).double()
        assert getattr(metric, f"{side}_features_num_samples") == len(files) and f.std(0).max() > 1e-3
        assert torch.allclose(getattr(metric, f"{side}_features_sum"), f.sum(0), rtol=1e-5, atol=1e-6)
        assert torch.allclose(getattr(metric, f"{side}_features_cov_sum"), f.T @ f, rtol=1e-5, atol=1e-6)


def test_fid_is_clean_fids_frechet_distance_of_the_same_features():
    """torchmetrics' Fréchet distance (Tr (Σ_r Σ_g)^½ from eigenvalues) against clean-fid's
    fid_from_feats (np.cov, scipy's sqrtm) on the same 16-d features."""
    from cleanfid.fid import fid_from_feats
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Given(torch.nn.Module):  # the features themselves, handed in as the images
        num_features = 16

        def forward(self, x):
            return x

    rng = np.random.default_rng(0)
    real = rng.standard_normal((40, 16)).astype(np.float32)
    fake = (1.5 * rng.standard_normal((30, 16)) + 0.3).astype(np.float32)
    metric = FrechetInceptionDistance(feature=Given())
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    assert float(metric.compute()) == pytest.approx(fid_from_feats(real, fake), rel=1e-5)


def test_fid_inception_that_is_not_torchscript_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / Q.INCEPTION_FILE)
    with pytest.raises(U.DataError, match="not clean-fid's TorchScript Inception"):
        Q.Fid([f"coco={tmp_path}"], str(tmp_path / Q.INCEPTION_FILE))


def test_coco_reference_images_are_found_by_the_rows_image_id(tmp_path):
    from lib import data as D
    from PIL import Image
    rows, _ = D.load_prompt_set(FIXTURES / "coco" / "rece_coco_30k_cut.csv")
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "COCO_val2014_000000203564.jpg")
    assert Q.coco_image(tmp_path, rows[0]) == tmp_path / "COCO_val2014_000000203564.jpg"
    with pytest.raises(U.DataError, match=r"rece_coco_30k_cut.csv:3: COCO image 179765 not found"):
        Q.coco_image(tmp_path, rows[1])


# ---------------------------------------------------------------------------------------
# Stage 5 with every scorer: Table 5's columns and Appendix D's table
# ---------------------------------------------------------------------------------------

def test_stage5_reports_table5_scores_and_fid_on_coco(tiny_clip, tiny_hps, tiny_imagereward, tiny_inception, tmp_path):
    from PIL import Image
    from conftest import stage, tiny_world_with_scm
    run = tiny_world_with_scm(tmp_path / "run")
    coco = tmp_path / "val2014"
    coco.mkdir()
    for k, image_id in enumerate((203564, 179765, 322141, 16977)):  # the first four rows of the ESD cut
        Image.fromarray(np.full((48, 64, 3), 40 * k, np.uint8)).save(coco / f"COCO_val2014_{image_id:012d}.jpg")
    aes = {k: torch.randn(s) for k, s in {"layers.0.weight": (8, 16), "layers.0.bias": (8,), "layers.2.weight": (8, 8),
                                          "layers.2.bias": (8,), "layers.4.weight": (4, 8), "layers.4.bias": (4,),
                                          "layers.6.weight": (2, 4), "layers.6.bias": (2,), "layers.7.weight": (1, 2),
                                          "layers.7.bias": (1,)}.items()}
    torch.save(aes, tmp_path / "aes.pth")
    r = stage("05_evaluate.py", run, "--prompt-sets", f"benign={run / 'world' / 'prompts' / 'benign_eval.jsonl'}",
              f"coco={FIXTURES / 'coco' / 'esd_coco_30k_cut.csv'}",
              "--quality", "pickscore", "--pickscore-model", str(tiny_clip), "--pickscore-processor", str(tiny_clip),
              "--hps-model", str(tiny_hps / "HPS_tiny.pt"), "--hps-arch", str(tiny_hps / "tiny-hps-ViT.json"),
              "--hps-version", "v2.1",
              "--imagereward-model", str(tiny_imagereward / "ImageReward.pt"),
              "--imagereward-tokenizer", str(tiny_imagereward / "tokenizer"),
              "--aes-model", str(tmp_path / "aes.pth"), "--aes-clip", str(tiny_clip), "--clip-model", str(tiny_clip),
              "--fid-reference", "toy", f"coco={coco}", "--fid-inception", str(tiny_inception))
    m = json.loads((run / "eval" / "metrics.json").read_text())
    for s in ("benign", "coco"):
        assert {"HPS", "ImageReward", "AES", "CLIPScore", "FID"} <= set(m["base"][s])
        assert all(np.isfinite(m["base"][s][k]) for k in ("HPS", "ImageReward", "AES", "CLIPScore", "FID"))
    rows = U.read_jsonl(run / "eval" / "scores.jsonl")
    coco_seeds = [x["seed"] for x in rows if x["set"] == "coco"]
    assert coco_seeds == [41337, 63155, 78978, 19959]  # the CSV's evaluation_seed
    report = (run / "eval" / "report.md").read_text()
    # HPS × 100, its version named (hpsv2's file names, or --hps-version)
    assert ("| model | benign PS↑ | benign HPSv2.1 × 100↑ | benign ImageReward↑ | benign AES↑ | "
            "benign CLIPScore↑ |") in report
    assert "## Image quality (paper Appendix D)" in report and "coco FID↓" in report and "benign FID↓" in report
    assert "each caption's COCO photograph, whole" in report and "toy world's render" in report
    assert "clean-fid's convention (every image resized whole to 299 × 299, PIL bicubic" in report
    # the toy quality reward cannot read COCO's captions: said, with the file
    r = stage("05_evaluate.py", run, "--prompt-sets", f"coco={FIXTURES / 'coco' / 'esd_coco_30k_cut.csv'}", check=False)
    assert r.returncode == 1 and "--quality toy: not a toy-world prompt" in r.stderr and "esd_coco_30k_cut.csv" in r.stderr
    # a COCO image missing from the folder is named, with its row
    (coco / "COCO_val2014_000000016977.jpg").unlink()
    r = stage("05_evaluate.py", run, "--prompt-sets", f"coco={FIXTURES / 'coco' / 'esd_coco_30k_cut.csv'}",
              "--quality", "pickscore", "--pickscore-model", str(tiny_clip), "--pickscore-processor", str(tiny_clip),
              "--fid-reference", f"coco={coco}", "--fid-inception", str(tiny_inception), check=False)
    assert r.returncode == 1 and "esd_coco_30k_cut.csv:5: COCO image 16977 not found" in r.stderr
    assert "Traceback" not in r.stderr
