"""Table 5's other preference scores and Appendix D's FID (~500 lines): HPSv2, ImageReward and
the LAION aesthetic score (AES), each its authors' architecture rebuilt with open_clip or
transformers and loaded from their published weights; and FID of a prompt set's images
against reference images (COCO-30K's COCO val2014 photographs, in clean-fid's convention as
RECE computes it, or the toy world's own renders), computed by torchmetrics.

The authors' packages (`hpsv2`, `image-reward`) pin versions that conflict with this
project's (timm 0.6, pytest 7, an import transformers 5 removed), so the architectures are
built here and every published key is checked to load: a missing or unexpected key stops
the load, naming it.

What it is not: PickScore, CLIPScore and the judges (lib/scorers.py), the tables (05_evaluate.py).

  1. Published weights: a local file or one in the Hugging Face cache, loaded without running code
  2. AES (LAION aesthetic predictor v2) and the reward head it shares with ImageReward
  3. HPSv2 (Wu et al. 2023)
  4. ImageReward (Xu et al. 2023)
  5. FID (paper Appendix D): torchmetrics on clean-fid's resize and Inception, or the toy's features
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from lib import scorers as S
from lib import utils as U

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# Stage 5's flags of these scorers (registry.add_module_flags adds them with these presets).
# sd15 names the published files in the Hugging Face cache as OWNER/REPO/FILE.
EVAL_PRESETS = {
    "toy": dict(hps_model=None, hps_arch="ViT-H-14", hps_version=None, imagereward_model=None,
                imagereward_tokenizer="bert-base-uncased", aes_model=None, aes_clip="openai/clip-vit-large-patch14",
                fid_reference=["toy"], fid_inception=None),
    "sd15": dict(hps_model="xswu/HPSv2/HPS_v2.1_compressed.pt", hps_arch="ViT-H-14", hps_version=None,
                 imagereward_model="THUDM/ImageReward/ImageReward.pt", imagereward_tokenizer="bert-base-uncased",
                 aes_model="camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth",
                 aes_clip="openai/clip-vit-large-patch14", fid_reference=None, fid_inception=None),
    "tiny": {},
}

PUBLISHED = {  # where each weights file is published, for the message when it is missing
    "--hps-model": "huggingface.co/xswu/HPSv2 (HPS_v2.1_compressed.pt; HPS_v2_compressed.pt is v2.0)",
    "--imagereward-model": "huggingface.co/THUDM/ImageReward (ImageReward.pt)",
    "--aes-model": "github.com/christophschuhmann/improved-aesthetic-predictor (sac+logos+ava1-l14-linearMSE.pth)",
    "--fid-inception": "nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt "
                       "(clean-fid's download)",
}
# hpsv2's checkpoints and their versions (hpsv2/utils.py, hps_version_map): the two versions'
# scores are not comparable (hpsv2's README), so Table 5 names the one it used
HPS_FILES = {"HPS_v2_compressed.pt": "v2.0", "HPS_v2.1_compressed.pt": "v2.1"}
# clean-fid's Inception: NVIDIA's TorchScript export of TF's 2015-12-05 Inception, which
# clean-fid reads from <folder>/inception-2015-12-05.pt, downloading it to /tmp when absent
INCEPTION_FILE = "inception-2015-12-05.pt"
CLEANFID_DOWNLOAD = f"/tmp/{INCEPTION_FILE}"


def add_flags(p) -> None:
    g = p.add_argument_group("Table 5's preference scores and Appendix D's FID (lib/quality_metrics.py)")
    g.add_argument("--hps-model", help="HPSv2 checkpoint: a file, or OWNER/REPO/FILE in the Hugging Face cache "
                                       "(sd15: xswu/HPSv2/HPS_v2.1_compressed.pt; default toy: none)")
    g.add_argument("--hps-arch", help="its OpenCLIP architecture: a name (ViT-H-14) or a model-config JSON file")
    g.add_argument("--hps-version", choices=sorted(HPS_FILES.values()),
                   help="the checkpoint's HPS version, named in Table 5 (default: read off hpsv2's file names, "
                        + ", ".join(f"{f} is {v}" for f, v in HPS_FILES.items()) + ")")
    g.add_argument("--imagereward-model", help="ImageReward.pt: a file, or OWNER/REPO/FILE in the Hugging Face cache")
    g.add_argument("--imagereward-tokenizer", help="ImageReward's BERT tokenizer (bert-base-uncased), a folder or id")
    g.add_argument("--aes-model", help="the LAION aesthetic predictor's sac+logos+ava1-l14-linearMSE.pth")
    g.add_argument("--aes-clip", help="the CLIP its embeddings come from (openai/clip-vit-large-patch14)")
    g.add_argument("--fid-reference", nargs="+", metavar="SET=DIR|toy",
                   help="FID's reference images per prompt set: a folder of COCO val2014 images for a COCO-30K set, "
                        "or `toy`: every benign set against the toy world's renders of its prompts (toy default)")
    g.add_argument("--fid-inception", help=f"clean-fid's TorchScript Inception, a file named {INCEPTION_FILE} "
                                           f"(default: {CLEANFID_DOWNLOAD}, where clean-fid downloads it)")


# ----------------------------------------------------------------------------------------
# 1. Published weights
# ----------------------------------------------------------------------------------------

def published_file(spec: str, flag: str) -> Path:
    """A weights file: a path, or OWNER/REPO/FILE in the local Hugging Face cache; a missing
    one stops with one message naming it and where it is published."""
    if Path(spec).is_file():
        return Path(spec)
    parts = spec.split("/")
    if len(parts) >= 3 and not Path(spec).is_absolute():
        from huggingface_hub import hf_hub_download
        try:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), local_files_only=True))
        except Exception:  # huggingface_hub's several "not in the cache" errors
            pass
    raise SystemExit(f"{flag} {spec}: weights file not found (no such file, nor in the local Hugging Face cache). "
                     f"It is published at {PUBLISHED[flag]}; download it on a machine with internet and pass its "
                     f"path with {flag} PATH.")


def load_weights(path: Path, flag: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, read without running code (torch.load's weights_only, or
    safetensors); a pickle that names anything else is refused."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise U.DataError(f"{flag} {path}: not a checkpoint of tensors, refused ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]})") from None


def load_exactly(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """module.load_state_dict(state) where every key of each side must meet one of the other,
    with its shape: a published checkpoint that does not fit is named, never half-loaded."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        say = lambda what, keys: f"{len(keys)} {what} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
        raise U.DataError(f"{where}: the checkpoint does not fit the architecture: " + "; ".join(
            say(w, k) for w, k in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("keys of another shape", wrong)) if k))
    module.load_state_dict(state)


def batches(images: Sequence[np.ndarray], prompts: Sequence[str], transform, size: int, device
            ) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(pixels, prompts) `size` at a time: uint8 [H, W, 3] arrays through a torchvision
    transform of PIL images, stacked on the device; the loop HPSv2 and ImageReward share."""
    from PIL import Image
    for i in range(0, len(images), size):
        yield torch.stack([transform(Image.fromarray(x)) for x in images[i:i + size]]).to(device), list(prompts[i:i + size])


# ----------------------------------------------------------------------------------------
# 2. AES (Schuhmann et al., LAION aesthetic predictor v2): a linear head on the L2-normalised
# CLIP ViT-L/14 image embedding, regressed on 1-10 ratings; images score about 4-7.
# ----------------------------------------------------------------------------------------

def reward_head(state: dict[str, torch.Tensor], prefix: str = "layers.") -> torch.nn.Sequential:
    """The head AES and ImageReward share, sized from the checkpoint (published: 768 → 1024 →
    128 → 64 → 16 → 1, dropout after the first three layers, no activations):
        head(e) = W_7 W_6 W_4 W_2 W_0 e + b   (an affine map in eval mode)"""
    w = [state[f"{prefix}{i}.weight"].shape for i in (0, 2, 4, 6, 7)]
    L, D = torch.nn.Linear, torch.nn.Dropout
    return torch.nn.Sequential(L(w[0][1], w[0][0]), D(0.2), L(w[1][1], w[1][0]), D(0.2), L(w[2][1], w[2][0]), D(0.1),
                               L(w[3][1], w[3][0]), L(w[4][1], w[4][0]))


class Aesthetic:
    """AES(x) = head(e(x)),  e(x) = f(x) / ‖f(x)‖, f = CLIP ViT-L/14's projected image embedding
    (transformers' openai/clip-vit-large-patch14 is the OpenAI model the head was fit on)."""

    def __init__(self, weights: str, clip_name: str, device="cpu"):
        path = published_file(weights, "--aes-model")
        state = load_weights(path, "--aes-model")
        self.head = reward_head(state)
        load_exactly(torch.nn.ModuleDict({"layers": self.head}), state, f"--aes-model {path}")
        self.head.to(device).eval()
        self.clip = S.ClipScorer(clip_name, clip_name, "the CLIP of AES (ViT-L/14)", "--aes-clip", "--aes-clip", device)
        if self.clip.model.config.projection_dim != self.head[0].in_features:
            raise U.DataError(f"--aes-model {path}: its head reads {self.head[0].in_features}-d embeddings, but "
                              f"{clip_name} embeds into {self.clip.model.config.projection_dim}-d")

    @classmethod
    def from_args(cls, args, device):
        return cls(args.aes_model, args.aes_clip, device)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str] | None = None) -> list[float]:
        emb, _ = self.clip.unit_embeddings(images)
        dev = next(self.head.parameters()).device
        return self.head(emb.to(dev)).squeeze(-1).float().cpu().tolist()


# ----------------------------------------------------------------------------------------
# 3. HPSv2 (Wu et al. 2023): OpenCLIP ViT-H-14 fine-tuned on human preferences. Scored × 100,
# as hpsv2's benchmark evaluation prints it and Table 5 reports it (25.8-28.0); hpsv2.score
# returns the raw cosine.
# ----------------------------------------------------------------------------------------

def openclip_arch(arch: str) -> str:
    """An OpenCLIP architecture by name, or from a model-config JSON file (its stem the name)."""
    import open_clip
    if arch.endswith(".json"):
        if not Path(arch).is_file():
            raise SystemExit(f"--hps-arch {arch}: file not found")
        open_clip.add_model_config(arch)
        return Path(arch).stem
    if arch not in open_clip.list_models():
        raise SystemExit(f"--hps-arch {arch}: not an OpenCLIP architecture (open_clip.list_models())")
    return arch


def hps_version(path: Path, version: str | None) -> str:
    """The checkpoint's version: --hps-version, else its file name's in HPS_FILES."""
    if version is None and path.name not in HPS_FILES:
        raise SystemExit(f"--hps-model {path}: not one of hpsv2's file names ({', '.join(HPS_FILES)}), so its "
                         f"version is unknown: name it with --hps-version {'|'.join(sorted(HPS_FILES.values()))}")
    return version or HPS_FILES[path.name]


class HPSv2:
    """HPS(x, c) = 100 · cos(f(x), g(c)) with the HPS checkpoint's OpenCLIP image and text
    towers. Images are letterboxed as hpsv2 does: the longer side resized to 224 (bicubic),
    the shorter padded black, never cropped. `label` names the version: "HPSv2.1 × 100"."""

    def __init__(self, weights: str, arch: str = "ViT-H-14", version: str | None = None, device="cpu",
                 batch_size: int = 16):
        import open_clip
        name = openclip_arch(arch)
        path = published_file(weights, "--hps-model")
        self.label = f"HPS{hps_version(path, version)} × 100"
        ckpt = load_weights(path, "--hps-model")
        state = ckpt.get("state_dict", ckpt)  # hpsv2 saves {"state_dict": ...}
        self.model = open_clip.create_model(name, pretrained=None)
        load_exactly(self.model, state, f"--hps-model {path}")
        self.model.to(device).eval()
        size = self.model.visual.image_size
        self.transform = open_clip.image_transform(size[0] if isinstance(size, tuple) else size, is_train=False,
                                                   mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode="longest")
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device, self.batch_size = device, batch_size

    @classmethod
    def from_args(cls, args, device):
        return cls(args.hps_model, args.hps_arch, args.hps_version, device)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        out = []
        for x, texts in batches(images, prompts, self.transform, self.batch_size, self.device):
            img = self.model.encode_image(x, normalize=True)
            txt = self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True)
            out += (100 * (img * txt).sum(-1)).float().cpu().tolist()
        return out


# ----------------------------------------------------------------------------------------
# 4. ImageReward (Xu et al. 2023): BLIP's ViT-L/16 at 224 px, a BERT-base text encoder that
# cross-attends to the image tokens, and the reward head on the [CLS] state.
# ----------------------------------------------------------------------------------------

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py's constants
IMAGEREWARD_MAX_TOKENS = 35
# Published, unused by the reward: BLIP's contrastive projections, and BERT's position ids
# (a buffer transformers no longer saves).
IMAGEREWARD_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")
# BLIP's ViT names -> transformers' BlipVisionModel names (as transformers' BLIP conversion does)
BLIP_VIT_NAMES = [(r"^cls_token$", "embeddings.class_embedding"), (r"^pos_embed$", "embeddings.position_embedding"),
                  (r"^patch_embed\.proj\.", "embeddings.patch_embedding."), (r"^blocks\.", "encoder.layers."),
                  (r"\.norm1\.", ".layer_norm1."), (r"\.norm2\.", ".layer_norm2."), (r"\.attn\.proj\.", ".self_attn.projection."),
                  (r"\.attn\.qkv\.", ".self_attn.qkv."), (r"^norm\.", "post_layernorm.")]


def imagereward_state(published: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt's keys in this module's names: blip.visual_encoder.* -> vision.*
    (renamed), blip.text_encoder.* -> text.* (the same BERT names), mlp.layers.* -> head.*."""
    out = {}
    for key, value in published.items():
        if IMAGEREWARD_UNUSED.search(key):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder."):]
            for pattern, repl in BLIP_VIT_NAMES:
                name = re.sub(pattern, repl, name)
            out["vision." + name] = value
        elif key.startswith("blip.text_encoder."):
            out["text." + key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp.layers."):
            out["head." + key[len("mlp.layers."):]] = value
        else:
            out[key] = value  # left for load_exactly to name
    return out


def imagereward_configs(published: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """BlipVisionConfig and BlipTextConfig fields read off the checkpoint's shapes (published:
    ViT-L/16 at 224 px, 1024 wide, 24 layers; BERT-base, 768 wide, 12 layers, vocabulary 30,524).
    Both use 64-wide attention heads; the ViT's LayerNorm eps is 1e-6, BERT's 1e-12."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    layers = lambda prefix: len({k[len(prefix):].split(".")[0] for k in published if k.startswith(prefix)})
    pos, patch = published[v + "pos_embed"].shape, published[v + "patch_embed.proj.weight"].shape
    width, words = pos[-1], published[t + "embeddings.word_embeddings.weight"].shape
    vision = dict(hidden_size=width, num_attention_heads=max(1, width // 64), num_hidden_layers=layers(v + "blocks."),
                  intermediate_size=published[v + "blocks.0.mlp.fc1.weight"].shape[0], patch_size=patch[-1],
                  image_size=patch[-1] * int(round((pos[1] - 1) ** 0.5)), layer_norm_eps=1e-6, hidden_act="gelu")
    text = dict(vocab_size=words[0], hidden_size=words[1], num_attention_heads=max(1, words[1] // 64),
                num_hidden_layers=layers(t + "encoder.layer."),
                intermediate_size=published[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                max_position_embeddings=published[t + "embeddings.position_embeddings.weight"].shape[0],
                encoder_hidden_size=published[t + "encoder.layer.0.crossattention.self.key.weight"].shape[1],
                layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True,  # is_decoder: build the cross-attention
                bos_token_id=words[0] - 2, sep_token_id=None)  # [DEC], BLIP's first added token; no [SEP] in use
    return vision, text


class ImageRewardModel(torch.nn.Module):
    """transformers' BlipVisionModel and BlipTextModel (BLIP's layout, key for key) and the head:
        r(x, c) = (head(h_[CLS]) − 0.16717) / 1.03334,
        h = BERT(c tokens, cross-attending to ViT(x))' last hidden states"""

    def __init__(self, vision: dict, text: dict, head: torch.nn.Sequential):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel
        self.vision = BlipVisionModel(BlipVisionConfig(**vision))
        self.text = BlipTextModel(BlipTextConfig(**text), add_pooling_layer=False)
        self.head = head

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.vision(pixel_values=pixels).last_hidden_state
        # is_decoder=False: the text attends both ways, as ImageReward's BERT does in its "multimodal" mode
        h = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                      is_decoder=False).last_hidden_state[:, 0]
        return ((self.head(h) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


class ImageReward:
    """ImageReward's score of each image for its prompt: images resized (shorter side, bicubic)
    and centre-cropped to 224, CLIP's normalisation; prompts in BERT's uncased WordPiece with
    BLIP's two added tokens ([DEC], [ENC]), padded or cut to 35 tokens."""

    def __init__(self, weights: str, tokenizer: str = "bert-base-uncased", device="cpu", batch_size: int = 16):
        from torchvision import transforms as T
        from transformers import BertTokenizer
        from lib import models as M
        path = published_file(weights, "--imagereward-model")
        published = load_weights(path, "--imagereward-model")
        vision, text = imagereward_configs(published)
        state = imagereward_state(published)
        self.model = ImageRewardModel(vision, text, reward_head(state, "head."))
        load_exactly(self.model, state, f"--imagereward-model {path}")
        self.model.to(device).eval()
        self.tokenizer = M.from_pretrained_or_exit(BertTokenizer.from_pretrained, tokenizer, "ImageReward's tokenizer",
                                                   "--imagereward-tokenizer")
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        if len(self.tokenizer) != text["vocab_size"]:
            raise U.DataError(f"--imagereward-tokenizer {tokenizer}: {len(self.tokenizer)} tokens with BLIP's two, "
                              f"but {path} embeds {text['vocab_size']}")
        size = vision["image_size"]
        self.transform = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                                    T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])
        self.device, self.batch_size = device, batch_size

    @classmethod
    def from_args(cls, args, device):
        return cls(args.imagereward_model, args.imagereward_tokenizer, device)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        out = []
        for x, texts in batches(images, prompts, self.transform, self.batch_size, self.device):
            tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_TOKENS,
                                 return_tensors="pt").to(self.device)
            out += self.model(x, tok.input_ids, tok.attention_mask).float().cpu().tolist()
        return out


# ----------------------------------------------------------------------------------------
# 5. FID (Heusel et al. 2017; paper Appendix D): the Fréchet distance between Gaussians fit to
# the features of a model's images and of reference images,
#     FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½)
# computed by torchmetrics' FrechetInceptionDistance. COCO-30K: clean-fid's "clean" convention,
# which RECE's execs/fid_score.py uses (cleanfid.fid.compute_fid on a folder of generated
# images and one of COCO photographs copied whole): every image, at its native size, resized to
# 299 x 299 by PIL's bicubic filter (antialiased) on each channel as floats, not quantised,
# then Inception's 2,048 pool features from clean-fid's TorchScript network. Toy: toy_features.
# ----------------------------------------------------------------------------------------

class ToyFeatures(torch.nn.Module):
    """toyworld.toy_features as the feature network torchmetrics takes: uint8 [B, 3, H, W] -> [B, 29]."""

    def __init__(self):
        super().__init__()
        from lib.toyworld import TOY_FEATURES
        self.num_features = TOY_FEATURES

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from lib.toyworld import toy_features
        arrays = images.permute(0, 2, 3, 1).cpu().numpy()
        return torch.from_numpy(np.stack([toy_features(a) for a in arrays])).to(images.device)


def clean_resize(image: np.ndarray) -> np.ndarray:
    """clean-fid's "clean" resize: uint8 [H, W, 3] of any size -> float32 [299, 299, 3] in
    [0, 255], no crop."""
    from cleanfid.resize import build_resizer
    return build_resizer("clean")(image)


def inception_file(spec: str | None) -> Path:
    """clean-fid's Inception file, by default where clean-fid downloads it."""
    path = published_file(spec or CLEANFID_DOWNLOAD, "--fid-inception")
    if path.name != INCEPTION_FILE:
        raise SystemExit(f"--fid-inception {path}: clean-fid reads its Inception by the name {INCEPTION_FILE}; "
                         f"rename the file")
    return path


def clean_inception(path: Path) -> torch.nn.Module:
    """clean-fid's Inception as the feature network torchmetrics takes: clean-resized float
    [B, 3, 299, 299] in [0, 255] -> [B, 2048], (x − 128) / 128 through the network. The file is
    TorchScript: torch.jit.load runs its graph in torch's interpreter, not a Python pickle."""
    from cleanfid.inception_torchscript import InceptionV3W
    try:
        net = InceptionV3W(str(path.parent), download=False)  # reads <folder>/INCEPTION_FILE; fetches nothing
    except RuntimeError as e:  # torch.jit.load's "not a TorchScript archive"
        raise U.DataError(f"--fid-inception {path}: not clean-fid's TorchScript Inception ("
                          f"{str(e).splitlines()[0]})") from None
    net.num_features = 2048  # read by torchmetrics instead of a trial forward
    return net


def coco_image(folder: Path, row: dict) -> Path:
    """The COCO val2014 photograph of a COCO-30K caption: COCO_val2014_<id:012>.jpg (as COCO
    ships it) or <id:012>.jpg."""
    if row.get("coco_id") is None:
        raise U.DataError(f"{row['where']}: no COCO image id (coco_id or image_id column) for --fid-reference")
    for name in (f"COCO_val2014_{row['coco_id']:012d}.jpg", f"{row['coco_id']:012d}.jpg"):
        if (folder / name).is_file():
            return folder / name
    raise U.DataError(f"{row['where']}: COCO image {row['coco_id']} not found in {folder} "
                      f"(COCO_val2014_{row['coco_id']:012d}.jpg)")


class Fid:
    """FID per model on each prompt set that has reference images (--fid-reference). The
    references are featurised once per set and kept (torchmetrics' reset_real_features=False)."""

    def __init__(self, references: list[str], inception: str | None, device="cpu", batch_size: int = 64):
        self.toy = "toy" in references
        self.folders = U.name_value_pairs([r for r in references if r != "toy"], "--fid-reference")
        for name, folder in self.folders.items():
            if not Path(folder).is_dir():
                raise SystemExit(f"--fid-reference {name}={folder}: no such folder")
        self.inception = inception_file(inception) if self.folders else None
        self.network = clean_inception(self.inception) if self.folders else None
        self.device, self.batch_size = device, batch_size

    @classmethod
    def from_args(cls, args, device):
        return cls(args.fid_reference, args.fid_inception, device)

    def definition(self, sets: list[str]) -> str:
        refs = [f"`{s}` against {self.folders[s]} (each caption's COCO photograph, whole)" if s in self.folders
                else f"`{s}` against the toy world's render of each drawn prompt and seed" for s in sets]
        features = ("clean-fid's convention (every image resized whole to 299 × 299, PIL bicubic, antialiased, "
                    f"unquantised; Inception's 2,048 pool features, clean-fid's network {self.inception})"
                    if self.folders else "")
        toy = "the toy's 29 features (toyworld.toy_features: the percent of pixels of each palette colour, edge energy, off-palette distance)" \
            if self.toy else ""
        return (f"Fréchet distance of each model's images to reference images, {'; '.join(refs)}; in "
                f"{' and '.join(x for x in (features, toy) if x)} (torchmetrics). Lower is closer.")

    def covers(self, name: str, rows: list[dict], benign: bool) -> bool:
        """A set named in --fid-reference, or with `toy` a benign set of toy-world prompts (a
        set of other prompts has no render to compare with: said, and left without FID)."""
        if name in self.folders or not (self.toy and benign):
            return name in self.folders
        from lib.toyworld import is_prompt
        row = next((r for r in rows if not is_prompt(r["prompt"])), None)
        if row is not None:
            U.log(f"FID skipped on prompt set {name}: {row['where']} is not a toy-world prompt, so the world has "
                  f"no render of it (--fid-reference SET=DIR gives reference images)")
        return row is None

    def references(self, name: str, rows: list[dict], items: list[dict]) -> Iterator[np.ndarray]:
        """The reference images of a set, one at a time: each row's COCO photograph, clean-resized,
        or the toy world's render of each drawn (prompt, seed)."""
        if name in self.folders:
            paths = [coco_image(Path(self.folders[name]), row) for row in rows]  # all found before any is read
            return (clean_resize(U.load_png(p)) for p in paths)
        from lib.toyworld import reference_render
        return (reference_render(it["prompt"], it["seed"]) for it in items)

    def generated(self, name: str, items: list[dict], out: Path) -> Iterator[np.ndarray]:
        """A model's images of a set, one at a time: clean-resized on a set with COCO references."""
        images = (U.load_png(out / it["image"]) for it in items)
        return map(clean_resize, images) if name in self.folders else images

    def _update(self, metric, images: Iterator[np.ndarray], real: bool) -> None:
        """Feed images to the metric batch by batch: memory stays flat over 30,000 of them."""
        while batch := list(itertools.islice(images, self.batch_size)):
            metric.update(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(self.device), real=real)

    def measure(self, name: str, rows: list[dict], per_model: dict[str, list[dict]], out: Path) -> dict[str, float]:
        """{model: FID} on one prompt set, every model's images against the same references."""
        from torchmetrics.image.fid import FrechetInceptionDistance
        feature = self.network if name in self.folders else ToyFeatures()
        # sync_on_compute=False: under torchrun, rank 0 scores alone (the others have left)
        metric = FrechetInceptionDistance(feature=feature, reset_real_features=False, sync_on_compute=False
                                          ).to(self.device)
        self._update(metric, self.references(name, rows, next(iter(per_model.values()))), real=True)
        fid = {}
        for model, items in per_model.items():
            self._update(metric, self.generated(name, items, out), real=False)
            fid[model] = float(metric.compute())
            metric.reset()  # the generated images only: the references stay
        return fid
