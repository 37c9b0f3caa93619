"""Text-to-image models as stock diffusers objects (~795 lines): loading, sampling, latents,
LoRA files, the model folders stage 5 finds, the image cache every evaluation shares, and the
toy VAE's pixel-weighted loss.

What it is not: the training loop and its math (04_train_spo.py, common.py), what is measured
on an image (lib/scorers.py).

  1. Loading: from_pretrained_or_exit, clip_tokenizer, sample_dtype, load_pipeline, save_pipeline
  2. Images and latents: load_image, encode_images, generate, to_uint8
  3. LoRA files: read_lora, write_lora, fuse_lora
  4. Model folders: a folder that holds `model.json` is a model stage 5 evaluates;
     registry.LOADERS says how to draw from each kind
  5. The image cache: fingerprint, image_path, draw_missing
  6. Stage 4's models: PromptEncoder and XLConditioned (SD-1.5's family and SDXL's),
     add_lora, load_training_models, build_caches, trainable_state, save_final
  7. Stage 4's loop plumbing: draw_batch, training_autocast, image_size, named_modules,
     dfm_layers, dfm_totals, count_dfm, nonfinite_loss
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lib import registry as R
from lib import utils as U


# ----------------------------------------------------------------------------------------
# 1. Loading: everything from the local Hugging Face cache or a folder, nothing downloaded
# ----------------------------------------------------------------------------------------

def from_pretrained_or_exit(load, name: str | Path, what: str, flag: str):
    """Call `load(name)`; turn a missing model into one message saying what to get and where.
    Everything loads from the local Hugging Face cache or a folder: nothing is downloaded
    when HF_HUB_OFFLINE=1, which is how the tests and CI run."""
    try:
        return load(str(name))
    except (OSError, ValueError) as e:
        if Path(str(name)).exists():
            raise
        raise SystemExit(
            f"cannot load {what} {str(name)!r} ({type(e).__name__}).\n"
            f"Download it into the Hugging Face cache on a machine with internet "
            f"(`hf download {name}`, then copy ~/.cache/huggingface/hub here), "
            f"or pass a local folder with {flag} PATH.") from None


def clip_tokenizer(max_length: int = 77):
    """CLIP's BPE tokenizer (the one SD-1.5 uses), built offline from the vocabulary that
    open_clip_torch ships, as a stock transformers CLIPTokenizer that saves with the pipeline."""
    import gzip
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]  # CLIP keeps the first 48894
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges, model_max_length=max_length)


def pick_device(name: str | None = None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


SAMPLE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def sample_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The precision a pipeline samples in. "auto": half precision where the hardware runs it
    natively — bf16 (else fp16) on CUDA, as SD is usually sampled; bf16 on a CPU with bf16
    instructions (AVX512-BF16 or AMX: the toy model samples 1.4x faster, and the toy judge
    agrees with the fp32 image on 98% of samples; bench/bench_toy_pipeline.py); fp32 anywhere
    else, where half precision would be emulated and slower."""
    if name not in SAMPLE_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {SAMPLE_DTYPES}")
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if re.search(r"\b(avx512_bf16|amx_bf16)\b", _cpu_flags()) else torch.float32


def _cpu_flags() -> str:
    cpuinfo = Path("/proc/cpuinfo")  # Linux; elsewhere "auto" stays fp32 on the CPU
    return cpuinfo.read_text() if cpuinfo.exists() else ""


def load_pipeline(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  safety_checker: tuple | None = None):
    """A text-to-image model folder or Hugging Face id (stage 0's, SD-1.5's, SDXL's, a stage-4
    output), loaded with the stock pipeline class its model_index.json names
    (StableDiffusionPipeline, StableDiffusionXLPipeline, ...). The safety checker is off (we
    measure safety) unless a (checker, feature extractor) pair is given: the post-hoc filter
    baseline, which only a pipeline with a safety checker takes."""
    import inspect
    import diffusers
    name = diffusers.DiffusionPipeline.load_config(str(path))["_class_name"]
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise SystemExit(f"{path}: model_index.json names {name!r}, which is no pipeline of diffusers")
    checker, extractor = safety_checker or (None, None)
    if "safety_checker" in inspect.signature(cls.__init__).parameters:
        kw = dict(safety_checker=checker, feature_extractor=extractor, requires_safety_checker=False)
    elif safety_checker:
        raise SystemExit(f"{path}: a {name} has no safety checker to filter with (the filter baseline takes "
                         f"SD-1.5's family)")
    else:
        kw = {}
    pipe = cls.from_pretrained(str(path), dtype=dtype, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def save_pipeline(pipe, folder: Path) -> None:
    """save_pretrained into a temporary folder, then swapped into place."""
    tmp = folder.with_name("." + folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    U.replace_dir(tmp, folder)

# ----------------------------------------------------------------------------------------
# 2. Images and latents
# ----------------------------------------------------------------------------------------

def load_image(path: str, size: int) -> torch.Tensor:
    """A PNG as the VAE's input: shorter side resized to `size`, centre-cropped, in [-1, 1]."""
    img = torch.from_numpy(np.array(U.load_png(path))).permute(2, 0, 1).float() / 127.5 - 1
    h, w = img.shape[1:]
    if (h, w) != (size, size):
        s = size / min(h, w)
        img = F.interpolate(img[None], size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                            align_corners=False, antialias=True)[0].clamp(-1, 1)
        top, left = (img.shape[1] - size) // 2, (img.shape[2] - size) // 2
        img = img[:, top:top + size, left:left + size]
    return img


def pixel_mask(x: torch.Tensor, colours) -> torch.Tensor:
    """[N, 1, H, W]: 1 where a pixel of x (in [-1, 1]) is exactly one of `colours` (RGB 0-255)."""
    rgb = ((x + 1) * 127.5).round()
    palette = torch.tensor(colours, dtype=x.dtype).view(1, -1, 3, 1, 1)
    return (rgb[:, None] == palette).all(dim=2).any(dim=1, keepdim=True).to(x.dtype)


def vae_loss(rec: torch.Tensor, x: torch.Tensor, w: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """A VAE's reconstruction loss, L1 + MSE with a tiny KL weight, each pixel weighted by w
    ([N, 1, H, W], broadcast over channels; the sums run over channels too):

        L = Σ w·(|x̂ − x| + (x̂ − x)²) / Σ w  +  1e-6·KL"""
    w = w.expand_as(x)
    err = (rec - x).abs() + (rec - x) ** 2
    return (w * err).sum() / w.sum() + 1e-6 * kl.mean()


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """VAE latents, scaled as the UNet expects. The posterior mean, not a sample: a cached
    latent must be one fixed tensor (SD's VAE posterior std is tiny next to its mean)."""
    return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
             batch_size: int = 64, size: int | Sequence[int] | None = None, **call) -> list[np.ndarray]:
    """Sample one image per (prompt, seed) as uint8 [H, W, 3], `size` pixels square, or
    (width, height), or the model's own size. Each image has its own generator, so an image
    does not depend on which batch it fell in. `call`: further arguments of the pipeline's call
    (SLD's; or prompt_embeds for one batch, prompts None)."""
    if prompts is not None and len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = (size, size) if isinstance(size, int) else size
    f = pipe.vae_scale_factor
    out = []
    for i in range(0, len(seeds), batch_size):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        latents = torch.stack([torch.randn((pipe.unet.config.in_channels, height // f, width // f), generator=g)
                               for g in gens])
        imgs = pipe(None if prompts is None else list(prompts[i:i + batch_size]), num_inference_steps=steps,
                    guidance_scale=guidance, height=height, width=width,
                    latents=latents.to(pipe.device, pipe.unet.dtype), output_type="np", **call).images
        out.extend(to_uint8(imgs))
    return out


def drawable_multiple(path: Path) -> int:
    """A model folder's pipeline draws any width and height that are multiples of its VAE's
    downsampling factor (SD-1.5: 8), as the pipeline's own input check demands."""
    return 2 ** (len(U.read_json(Path(path) / "vae" / "config.json")["block_out_channels"]) - 1)


def to_uint8(images) -> np.ndarray:
    """A diffusers pipeline's output_type="np" images (floats in [0, 1]) as uint8 [B, H, W, 3]."""
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)

# ----------------------------------------------------------------------------------------
# 3. LoRA files, as diffusers' save_lora_weights writes them and load_lora_weights reads them
# ----------------------------------------------------------------------------------------

LORA_FILE = "pytorch_lora_weights.safetensors"  # what `pipe.load_lora_weights(folder)` reads


def read_lora(folder: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A UNet LoRA as `save_lora_weights` writes it: {module: (B [out, r], A [r, in])} with
    the adapter's scale α/r folded into B (α from the file's adapter metadata; α = r when
    the file has none, as diffusers assumes), so ΔW = B·A for every module."""
    from safetensors import safe_open
    path = Path(folder) / LORA_FILE
    if not path.exists():
        raise U.DataError(f"{path} does not exist (a LoRA folder holds {LORA_FILE})")
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))  # {"unet.r": …, "unet.lora_alpha": …}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    factors = {}
    for key, down in tensors.items():
        if key.startswith("unet.") and key.endswith(".lora.down.weight"):
            module = key[len("unet."):-len(".lora.down.weight")]
            up = tensors[f"unet.{module}.lora.up.weight"]
            r = down.shape[0]
            factors[module] = (up.float() * meta.get("unet.lora_alpha", r) / meta.get("unet.r", r), down.float())
    if not factors:
        raise U.DataError(f"{path}: no UNet LoRA weights (keys unet.<module>.lora.down/up.weight)")
    return factors


def write_lora(folder: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """{module: (B, A)} with ΔW = B·A, as a LoRA file stock diffusers loads (α = r per module,
    so its scale is 1); written to a temporary folder, then moved into place."""
    from diffusers import StableDiffusionPipeline
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    layers = {}
    for module, (up, down) in factors.items():
        layers[f"{module}.lora.down.weight"] = down.contiguous()
        layers[f"{module}.lora.up.weight"] = up.contiguous()
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def fuse_lora(pipe, lora: Path) -> None:
    """The LoRA folder's ΔW added into the pipeline's UNet weights (stock diffusers calls)."""
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    pipe.unload_lora_weights()


# ----------------------------------------------------------------------------------------
# 4. Model folders. Whatever builds a model (a stage-4 run, a merge, a baseline) leaves a
#    `model.json` beside it, and stage 5 evaluates every folder under the run that has one:
#    {"name", "kind", "pipeline", "lora", "aliases", "training", "black_is_refusal"}, paths
#    relative to the folder. "pipeline": null means the evaluated base model (a recipe applied
#    to it); "training": the stage-4 config.json of a trained model (Figs. 4A and 5 read it).
# ----------------------------------------------------------------------------------------

MANIFEST = "model.json"


@dataclasses.dataclass
class ModelSpec:
    """One model stage 5 evaluates, resolved to files."""
    name: str
    kind: str
    path: Path                      # the pipeline folder drawn from (the base model's, for a recipe)
    folder: Path | None = None      # the folder holding model.json (a recipe's files, a run's logs)
    lora: Path | None = None        # LoRA weights applied on top of `path`
    aliases: tuple[str, ...] = ()   # further names of the same model in the tables
    training: dict | None = None    # stage 4's config.json, for a model stage 4 trained
    black_is_refusal: bool = False  # an all-black image means the model refused (a filter)


def write_manifest(folder: Path, name: str, kind: str = "pipeline", pipeline: str | None = "model",
                   lora: str | None = None, aliases: Sequence[str] = (), training: str | None = None,
                   black_is_refusal: bool = False) -> None:
    """DIR/<...>/model.json: what stage 5 needs to find and draw from this model."""
    if kind not in R.LOADERS:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(R.LOADERS)}")
    U.atomic_write_json(Path(folder) / MANIFEST, {
        "name": name, "kind": kind, "pipeline": pipeline, "lora": lora, "aliases": list(aliases),
        "training": training, "black_is_refusal": black_is_refusal})


def read_manifest(folder: Path, base: Path) -> ModelSpec:
    """The ModelSpec of a folder holding model.json; `base` is the evaluated base model."""
    m = U.read_json(folder / MANIFEST)
    if m.get("kind") not in R.LOADERS:
        raise U.DataError(f"{folder / MANIFEST}: unknown kind {m.get('kind')!r} (known: {sorted(R.LOADERS)})")
    path = folder / m["pipeline"] if m.get("pipeline") else base
    return ModelSpec(m["name"], m["kind"], path, folder, folder / m["lora"] if m.get("lora") else None,
                     tuple(m.get("aliases", ())), U.read_json(folder / m["training"]) if m.get("training") else None,
                     bool(m.get("black_is_refusal")))


def discover(run: Path, base: Path) -> list[ModelSpec]:
    """Every model under the run folder, one or two folders down: DIR/<name>/ (stage 4's runs)
    in the order of their names, then DIR/<group>/<name>/ (merges, baselines)."""
    found = [*sorted(run.glob(f"*/{MANIFEST}")), *sorted(run.glob(f"*/*/{MANIFEST}"))] if run.is_dir() else []
    specs = [read_manifest(f.parent, base) for f in found]
    names = [n for s in specs for n in (s.name, *s.aliases)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise U.DataError(f"{run}: two model folders are named {twice} (model.json's name and aliases)")
    return specs


def local_model_folder(name_or_path: str, flag: str) -> Path:
    """A folder on disk, or a Hugging Face id resolved in the local cache. Nothing is
    downloaded: a missing model stops the run saying what to get and where to put it."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception as e:  # LocalEntryNotFoundError, or HF_HUB_OFFLINE refusing a lookup
            raise SystemExit(
                f"{name_or_path!r} is neither a folder nor a model in the local Hugging Face cache "
                f"({type(e).__name__}).\n"
                f"Download it on a machine with internet (`hf download {name_or_path}`, then copy "
                f"~/.cache/huggingface/hub here), or pass a local folder with {flag}.") from None
    raise SystemExit(f"{flag}: {path} does not exist")


def model_from_path(name: str, value: str, base: Path) -> ModelSpec:
    """--models NAME=PATH: a model folder (model.json), a pipeline folder, or a LoRA folder
    applied on top of the base model."""
    path = local_model_folder(value, f"--models {name}=PATH")
    if (path / MANIFEST).exists():
        return dataclasses.replace(read_manifest(path, base), name=name, aliases=())
    if (path / "model_index.json").exists():
        return ModelSpec(name, "pipeline", path)
    if (path / LORA_FILE).exists():
        return ModelSpec(name, "pipeline", base, lora=path)
    raise SystemExit(f"--models {name}={path}: not a model folder ({MANIFEST}), a pipeline folder "
                     f"(model_index.json) or a LoRA folder ({LORA_FILE})")


def resolve_models(base: str | None, given: list[str] | None, run: Path) -> list[ModelSpec]:
    """Stage 5's models: the base first (UAS takes its centres from it; --base, or stage 0's
    DIR/world/model), then --models NAME=PATH, or else every model folder under the run."""
    if base:
        spec = ModelSpec("base", "pipeline", local_model_folder(base, "--base PATH"))
    else:
        spec = ModelSpec("base", "pipeline", U.stage_dir(run, "world") / "model")
        U.require_inputs([spec.path / "model_index.json"], "world")
    named = U.name_value_pairs(given, "--models")
    if "base" in named:
        raise SystemExit("--models: the name 'base' is taken by --base")
    others = [model_from_path(n, v, spec.path) for n, v in named.items()] if named else discover(run, spec.path)
    if not others:
        U.log("no model folder found (run 04_train_spo.py, or pass --models NAME=PATH): evaluating the base alone")
    return [spec, *others]


def with_aliases(rows: list[dict], models: list[ModelSpec]) -> list[dict]:
    """Each model's rows again under each of its aliases (AlignGuard's row is its Co-Merge model)."""
    return rows + [dict(r, model=a) for m in models for a in m.aliases for r in rows if r["model"] == m.name]


def pipeline_sampler(spec: ModelSpec, device, dtype, steps: int):
    """A stock pipeline folder, with its LoRA loaded on top where it has one."""
    pipe = load_pipeline(spec.path, device, dtype)
    if spec.lora:
        pipe.load_lora_weights(str(spec.lora))
    return pipe, {}


def sampler(spec: ModelSpec, device, dtype, steps: int):
    """(pipeline, extra call arguments) for drawing from `spec`, by its kind's entry in
    registry.LOADERS."""
    return R.resolve(R.LOADERS[spec.kind])(spec, device, dtype, steps)


# ----------------------------------------------------------------------------------------
# 5. The image cache: an image is drawn once per (model files, prompt, seed, steps, guidance,
#    size, dtype) and kept as a PNG; every later evaluation reads it
# ----------------------------------------------------------------------------------------

def fingerprint(spec: ModelSpec) -> str:
    """What the image cache keys on: relative name, size and mtime of every file of the model
    (its pipeline, LoRA and recipe folder), so a model rebuilt in place never gets old images.
    The model card (README.md) is left out: it is documentation, and stage 5 rewrites it."""
    recipe = spec.folder if spec.folder and spec.folder not in (spec.path, *spec.path.parents) else None
    h = hashlib.sha1()
    for folder in [spec.path] + [f for f in (spec.lora, recipe) if f]:
        for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md"):
            st = f.stat()
            h.update(f"{f.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def image_path(name: str, fp: str, item: dict, steps: int, dtype: torch.dtype = torch.float32) -> str:
    """Where model `name`'s image of `item` lives, relative to DIR/eval. Size None means the
    model's native size, which its fingerprint already pins down."""
    # an fp32 key carries no dtype entry, so existing fp32 image caches stay valid
    key = json.dumps([fp, item["prompt"], item["seed"], steps, item["guidance"], item["size"]]
                     + ([] if dtype == torch.float32 else [str(dtype)]))
    return f"images/{name}/{hashlib.sha1(key.encode()).hexdigest()[:20]}.png"


def draw_missing(spec: ModelSpec, items: list[dict], out: Path, device, dtype, steps: int, batch_size: int) -> int:
    """Draw the images of `items` not on disk yet and return how many. A batch shares one
    guidance scale and size; each PNG is written (atomically) as its batch finishes, so a
    killed evaluation resumes with the images it made. Under torchrun each process draws
    every N-th batch."""
    todo = list({it["image"]: it for it in items if not (out / it["image"]).exists()}.values())
    if not todo:
        return 0
    groups = defaultdict(list)
    for it in todo:  # a size is one int (square) or [width, height]
        groups[it["guidance"], json.dumps(it["size"])].append(it)
    batches = U.my_share([g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)])
    pipe, call = sampler(spec, device, dtype, steps)
    for batch in tqdm(batches, desc=f"generate {spec.name}", disable=not U.is_main()):
        images = generate(pipe, [it["prompt"] for it in batch], [it["seed"] for it in batch], steps,
                          batch[0]["guidance"], batch_size, batch[0]["size"], **call)
        for it, img in zip(batch, images):
            U.save_png(out / it["image"], img)
    return len(todo)


# ----------------------------------------------------------------------------------------
# 6. Stage 4's models: the policy and its reference, the once-only caches of latents and text
#    embeddings, and the trained weights saved as stock diffusers folders
# ----------------------------------------------------------------------------------------

class PromptEncoder:
    """The frozen text side of a pipeline folder, as the UNet's conditioning of a batch of
    prompts. SD: its CLIP encoder's last states [N, L, D]. SDXL (a `text_time` UNet): its two
    encoders' penultimate states concatenated [N, L, D], then ONE MORE ROW packing the second
    encoder's pooled projection and the six time ids (h, w, 0, 0, h, w) of `size`-pixel images,
    which XLConditioned unpacks. In one tensor, SDXL's conditioning is cached, indexed and
    concatenated as SD's is, so stage 4 holds no branch for it."""

    def __init__(self, path, device, added_embedding: str | None):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
        self.xl = added_embedding == "text_time"
        parts = [("", CLIPTextModel)] + ([("_2", CLIPTextModelWithProjection)] if self.xl else [])
        load = lambda cls, sub: from_pretrained_or_exit(lambda m: cls.from_pretrained(m, subfolder=sub), path,
                                                          "the base model", "--model")
        self.encoders = [load(cls, f"text_encoder{n}").requires_grad_(False).eval().to(device) for n, cls in parts]
        self.tokenizers = [load(CLIPTokenizer, f"tokenizer{n}") for n, _ in parts]

    @torch.no_grad()
    def __call__(self, prompts: list[str], size: int) -> torch.Tensor:
        outs = [enc(tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(enc.device), output_hidden_states=self.xl)
                for enc, tok in zip(self.encoders, self.tokenizers)]
        if not self.xl:
            return outs[0][0]
        return pack_xl(outs, size)

    def cpu(self) -> None:
        for enc in self.encoders:
            enc.cpu()


def pack_xl(outs, size: int) -> torch.Tensor:
    """SDXL's conditioning from its two encoders' outputs (called with output_hidden_states):
    the penultimate states concatenated (SDXL reads that layer), then one row holding the second
    encoder's pooled projection and the time ids (h, w, 0, 0, h, w) of `size`-pixel images."""
    states = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
    pooled = outs[-1][0]
    if pooled.shape[-1] + 6 > states.shape[-1]:
        raise SystemExit(f"the pooled embedding ({pooled.shape[-1]}) and 6 time ids do not fit one row of "
                         f"{states.shape[-1]}: this SDXL-like model's conditioning cannot be packed")
    ids = torch.tensor([size, size, 0, 0, size, size], dtype=states.dtype, device=states.device)
    row = torch.cat([pooled, ids.expand(len(pooled), 6), states.new_zeros(len(pooled), states.shape[-1] - pooled.shape[-1] - 6)], dim=-1)
    return torch.cat([states, row[:, None]], dim=1)


class XLConditioned:
    """SDXL's UNet called as SD's is, net(x_t, t, emb), with emb packed by PromptEncoder:

        encoder_hidden_states = emb[:, :L],   text_embeds = emb[:, L, :P],   time_ids = emb[:, L, P:P+6]

    (P = projection_class_embeddings_input_dim − 6 · addition_time_embed_dim). Every other
    attribute is the UNet's own, so stage 4 trains, checkpoints and saves it as it does SD's."""

    def __init__(self, unet):
        c = unet.config
        self.__dict__.update(unet=unet, pooled=c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim)

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, x, t, emb, **kwargs):
        row, p = emb[:, -1], self.pooled
        return self.unet(x, t, emb[:, :-1], added_cond_kwargs={"text_embeds": row[:, :p], "time_ids": row[:, p:p + 6]},
                         **kwargs)


# LoRA's layers: the attention projections, as AlignGuard's public code adapts
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(unet, rank: int, alpha: float | None) -> None:
    """Freeze `unet` and add peft's LoRA of `rank` (α: the rank, unless given) on LORA_TARGETS:
    lora_A drawn from a Gaussian, lora_B zero, so training starts at the base model."""
    from peft import LoraConfig
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))


def load_training_models(args, device, frozen_unet: bool):
    """The policy ε_θ, the reference ε_ref, the frozen VAE and PromptEncoder, and the training
    noise scheduler. SD-1.5's family, or SDXL's (its UNets then called through XLConditioned)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    load = lambda cls, sub: from_pretrained_or_exit(lambda m: cls.from_pretrained(m, subfolder=sub), args.model,
                                                      "the base model", "--model")
    unet = load(UNet2DConditionModel, "unet")
    added = unet.config.addition_embed_type
    if added not in (None, "text_time"):
        raise SystemExit(f"--model {args.model}: its UNet takes added conditioning {added!r}; stage 4 trains "
                         f"SD-1.5's family and SDXL's (text_time)")
    wrap = XLConditioned if added == "text_time" else (lambda u: u)
    vae, prompts = load(AutoencoderKL, "vae"), PromptEncoder(args.model, device, added)
    noise_scheduler = load(DDPMScheduler, "scheduler")  # the training-time forward process
    vae.requires_grad_(False).eval().to(device)  # fp32 (SDXL's VAE overflows in fp16); it only fills the cache
    ref_dtype = torch.bfloat16 if args.bf16 and device.type == "cuda" else torch.float32
    if args.lora_rank > 0:
        # the reference is the same UNet with the adapters switched off, so no second copy is
        # held in memory
        add_lora(unet, args.lora_rank, args.lora_alpha)
        ref = None
    elif frozen_unet:  # an adapter on the UNet trains: the reference is the UNet without it
        unet.requires_grad_(False)
        ref = None
    else:
        ref = load(UNet2DConditionModel, "unet").requires_grad_(False).eval().to(device)
        if ref_dtype != torch.float32:
            ref.to(ref_dtype)
    if args.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(device).train()
    return wrap(unet), ref if ref is None else wrap(ref), vae, prompts, noise_scheduler


def cached(fn, items: list, folder: Path, name: str, dist: U.Dist, chunk: int = 512) -> torch.Tensor:
    """fn(list of items) -> tensor, computed once per chunk of items and kept as safetensors
    files; ranks share the chunks round-robin and then all read all of them."""
    from safetensors.torch import load_file, save_file
    files = [folder / f"{name}-{c:05d}.safetensors" for c in range(0, len(items), chunk)]
    for n, f in enumerate(files):
        if n % dist.world_size == dist.rank and not f.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".tmp{dist.rank}")
            save_file({"x": fn(items[n * chunk:(n + 1) * chunk]).float().cpu().contiguous()}, str(tmp))
            tmp.replace(f)
    if dist.enabled:
        torch.distributed.barrier()
    return torch.cat([load_file(str(f))["x"] for f in files])


def build_caches(args, pairs, vae, prompt_encoder: PromptEncoder, out: Path, dist: U.Dist, size: int):
    """Latents of every image and embeddings of every prompt, each computed exactly once.
    Public Diffusion-DPO runs the VAE and text encoder at every step; both are frozen, so
    their outputs are the same every time, and caching them takes them out of the loop."""
    files = sorted({p[s]["file"] for p in pairs for s in ("w", "l")})
    prompts = sorted({p["prompt"] for p in pairs})
    key = hashlib.sha1("\n".join([str(args.model), str(size), *files, *prompts]).encode()).hexdigest()[:12]
    folder = out / "cache" / key

    latents = cached(lambda b: encode_images(vae, torch.stack([load_image(f, size) for f in b])), files, folder,
                     "latents", dist, chunk=256)
    text = cached(lambda b: prompt_encoder(b, size), prompts, folder, "text", dist, chunk=256)
    file_index = {f: i for i, f in enumerate(files)}
    prompt_index = {p: i for i, p in enumerate(prompts)}
    index = torch.tensor([[file_index[p["w"]["file"]], file_index[p["l"]["file"]], prompt_index[p["prompt"]]]
                          for p in pairs])
    return latents, text, index


def trainable_state(unet, lora: bool) -> dict:
    if lora:
        from peft import get_peft_model_state_dict
        return get_peft_model_state_dict(unet)
    return unet.state_dict()


def load_trainable_state(unet, state: dict, lora: bool) -> None:
    if lora:
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(unet, state)
    else:
        unet.load_state_dict(state)


def save_final(args, unet, out: Path, weights: dict) -> None:
    """The aligned model as a stock pipeline folder of the base model's class; LoRA also as its
    own weights file that `pipe.load_lora_weights(out / "lora")` loads onto the base model.
    `weights`: the trained weights whole, as trainable_state gives them (a sharded UNet's are
    read back from its last checkpoint: shard.full_weights)."""
    pipe = load_pipeline(args.model)
    if args.lora_rank > 0:
        from diffusers.utils import convert_state_dict_to_diffusers
        tmp = out / ".lora.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        config = unet.peft_config["default"]  # r and α travel with the weights: load_lora_weights reads them
        type(pipe).save_lora_weights(
            tmp, unet_lora_layers=convert_state_dict_to_diffusers(weights),
            unet_lora_adapter_metadata={"r": config.r, "lora_alpha": config.lora_alpha,
                                        "target_modules": sorted(config.target_modules)})
        U.replace_dir(tmp, out / "lora")
        fuse_lora(pipe, out / "lora")
    else:
        pipe.unet.load_state_dict(weights)
    save_pipeline(pipe, out / "model")


# ----------------------------------------------------------------------------------------
# 7. Stage 4's loop plumbing: its machine flags, the batch each process draws, the autocast
#    of its forwards, the image size, the modules DFM reads, DFM's counts for the log and
#    metrics.json, the run's closing figures, and the error a non-finite loss stops it with
# ----------------------------------------------------------------------------------------

def add_machine_flags(p) -> None:
    """Stage 4's flags of how it runs, not of what it computes (on one process, unsharded)."""
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (GPU only)")
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--skip-bad", action=argparse.BooleanOptionalAction, help="skip bad pair rows")
    p.add_argument("--device")
    p.add_argument("--shard", action=argparse.BooleanOptionalAction, help="FSDP2 over torchrun's "
                   "processes: each holds 1/N of the weights, gradients and AdamW state")


def draw_batch(n_pairs: int, batch: int, mine: list[int], seed: int, step: int, n_timesteps: int,
               latent_shape) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """This process's pair ids of the global batch of step `step`, and their timesteps and noise.

    Epoch e visits the pairs in the order randperm(seed + e) (DistributedSampler's shuffle),
    batch k of it is that order's positions [k·B, (k+1)·B), and t and ε of the whole batch are
    drawn from (seed, step). Process r takes positions `mine` = r, r + N, r + 2N, ... of all
    three, so N processes compute what one computes, whether or not N divides B."""
    epoch, k = divmod(step, n_pairs // batch)
    shuffle = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_pairs, generator=shuffle).tolist()
    positions = order[k * batch:(k + 1) * batch]
    g = U.step_generator(seed, step)
    t_all = torch.randint(0, n_timesteps, (batch,), generator=g)
    noise_all = torch.randn((batch, *latent_shape), generator=g)
    return [positions[j] for j in mine], t_all[mine], noise_all[mine]


def training_autocast(bf16: bool, device: torch.device):
    """The context the training forwards run in: bf16 autocast on a GPU when asked, else none."""
    use = bf16 and device.type == "cuda"
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16) if use else contextlib.nullcontext()


def image_size(unet, vae) -> int:
    """The side in pixels of the images a UNet denoises the latents of: its latent side times
    the VAE's downsampling."""
    return unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)


def named_modules(net, names: list[str], flag: str) -> dict[str, torch.nn.Module]:
    """The submodules of `net` called `names`; a name it lacks stops the run, naming `flag`."""
    named = dict(net.named_modules())
    if not all(m in named for m in names):
        raise SystemExit(f"{flag}: no module {sorted(set(names) - set(named))} in the UNet")
    return {m: named[m] for m in names}


def dfm_layers(unet, args) -> list[torch.nn.Module]:
    """The layers whose weight gradients Eq. 11 compares (common.augmentation_scores), named in
    the log. Eq. 11 compares the gradients of weights that train: with full fine-tuning those
    of the --dfm-modules; LoRA freezes them, and under it the LoRA factors (peft's lora_A and
    lora_B layers) of the adapted layers at or inside the --dfm-lora-modules, by default the
    decoder's last adapted transformer block: the adapted layers nearest the output, as
    conv_out is the layer nearest it, so the backward Eq. 11 needs stays short. Two flags, as
    the two defaults differ and a preset holds one value per flag."""
    if args.lora_rank == 0:
        if args.dfm_lora_modules:
            raise SystemExit("--dfm-lora-modules names the LoRA factors Eq. 11 compares under "
                             "--lora-rank > 0; with full fine-tuning, name --dfm-modules")
        layers = named_modules(unet, args.dfm_modules, "--dfm-modules")
    else:
        layers = lora_factors(unet, args.dfm_lora_modules or [last_adapted_block(unet)])
    U.log(f"Eq. 11 compares the gradients of the weights of {', '.join(layers)}")
    return list(layers.values())


def lora_factors(unet, names: list[str]) -> dict[str, torch.nn.Module]:
    """peft's lora_A and lora_B layers (of the active adapters) of every LoRA-adapted layer at
    or inside the modules `names`, by name; a module with none stops the run."""
    from peft.tuners.lora import LoraLayer
    factors, bare = {}, []
    for name, module in named_modules(unet, names, "--dfm-lora-modules").items():
        adapted = [(f"{name}.{n}" if n else name, m) for n, m in module.named_modules()
                   if isinstance(m, LoraLayer)]
        if not adapted:
            bare.append(name)
        for layer_name, layer in adapted:
            for a in layer.active_adapters:
                factors[f"{layer_name}.lora_A.{a}"] = layer.lora_A[a]
                factors[f"{layer_name}.lora_B.{a}"] = layer.lora_B[a]
    if bare:
        raise SystemExit(f"--dfm-lora-modules: {bare} carry no LoRA adapter (--lora-rank adapts "
                         f"the attention projections {', '.join(LORA_TARGETS)}): Eq. 11 compares "
                         f"trained weights, so name modules that hold adapted layers")
    return factors


def last_adapted_block(unet) -> str:
    """The name of the decoder's last transformer block holding LoRA layers: searched among the
    up blocks, which run in the order they are listed (a UNet lists its mid block after them,
    though it runs before)."""
    from diffusers.models.attention import BasicTransformerBlock
    from peft.tuners.lora import LoraLayer
    blocks = [n for n, m in unet.up_blocks.named_modules() if isinstance(m, BasicTransformerBlock)
              and any(isinstance(x, LoraLayer) for x in m.modules())]
    if not blocks:
        raise SystemExit("--dfm-lora-modules: the UNet's decoder holds no adapted transformer "
                         "block; name the modules whose LoRA factors Eq. 11 compares")
    return f"up_blocks.{blocks[-1]}"


def dfm_totals(augmentations) -> dict:
    """What DFM did over a run, for metrics.json: visits flagged (all, and by pair kind), the
    pairs ever flagged, and how often each augmentation won Eq. 11."""
    return {"dfm_flagged": 0, "aug_wins": dict.fromkeys(augmentations, 0),
            "dfm_flagged_by_kind": {}, "dfm_pairs_flagged": []}


def count_dfm(totals: dict, pairs: list[dict], ids: list[int], losses: torch.Tensor,
              hard_ids: set, counts: torch.Tensor) -> dict:
    """Adds one step of DFM to `totals` (dfm_totals): the pairs Eq. 10 flagged among the
    batch's `ids`, and `counts`, each augmentation's wins (in aug_wins' order) and then the sum
    of the copies' losses. Returns the step's log figures: the flagged pairs' loss beside their
    copies' (a copy easier than its original gives the pair little new signal)."""
    totals["dfm_flagged"] += len(hard_ids)
    wins = zip(totals["aug_wins"], counts[:-1].tolist())
    totals["aug_wins"] = {a: totals["aug_wins"][a] + int(n) for a, n in wins}
    flagged = set(totals["dfm_pairs_flagged"])
    for i in hard_ids:
        kind = pairs[i]["kind"]
        totals["dfm_flagged_by_kind"][kind] = totals["dfm_flagged_by_kind"].get(kind, 0) + 1
        flagged.add(i)
    totals["dfm_pairs_flagged"] = sorted(flagged)
    if not hard_ids:
        return {}
    hard_loss = losses[[k for k, i in enumerate(ids) if i in hard_ids]].mean().item()
    return {"dfm_hard_loss": hard_loss, "dfm_copy_loss": float(counts[-1]) / len(hard_ids)}


def safe_side_wins(pairs: list[dict]) -> float:
    """The share of relabelled harmful-safe pairs whose safe image is the winner."""
    hs = [p for p in pairs if p["kind"] == "harmful-safe"]
    return sum(p["w"]["role"] == "safe" for p in hs) / max(1, len(hs))


def require_a_batch(pairs: list[dict], batch: int, dropped: int, path: Path) -> None:
    if len(pairs) < batch:
        raise U.DataError(f"{path}: {len(pairs)} pairs left after relabelling and selection "
                          f"({dropped} dropped by --margin), fewer than one batch of {batch}")


def closing_figures(log: Path, steps: int, totals: dict) -> dict:
    """metrics.json's training figures: the loss and implicit accuracy averaged over the logged
    steps of the last tenth of training (the last logged step, if none), and DFM's totals."""
    rows = {r["step"]: r for r in U.read_jsonl(log)}
    last = [r for s, r in rows.items() if s > 0.9 * steps] or [rows[max(rows)]]
    return {"final_loss": float(np.mean([r["loss"] for r in last])),
            "implicit_accuracy": float(np.mean([r["implicit_accuracy"] for r in last])),
            "dfm_flagged": totals["dfm_flagged"], "aug_wins": totals["aug_wins"],
            "dfm_flagged_by_kind": totals["dfm_flagged_by_kind"],
            "dfm_pairs_flagged": len(totals["dfm_pairs_flagged"])}


def nonfinite_loss(ckpt: Path, step: int, why: str) -> FloatingPointError:
    """The error a non-finite loss stops stage 4 with, naming the checkpoint to go back to."""
    last = ckpt if ckpt.exists() else "(none yet)"
    return FloatingPointError(f"non-finite DPO loss at step {step} ({why}); "
                              f"the last good checkpoint is {last}")
