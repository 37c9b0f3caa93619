"""Personalized Safety Alignment (PSA): one model whose safety boundary follows its user.

A child's profile bans all seven harm categories; an adult artist's bans none. PSA conditions
the frozen text-to-image model on the user through a cross-attention adapter, and trains the
adapter with Diffusion-DPO on preferences that depend on the user (~600 lines: its users, its
per-user rewards, its adapter and how it trains; its evaluation is systems/psa_eval.py).

Commands (DIR = --run):
  python -m systems.psa users    simulated users (toy): profiles with attributes (a third: adults
                         asking not to see one category), and the banned categories their
                         written rules imply (banned_categories: in the toy world a program, so
                         exact); held-out users; six reference users from permissive to
                         restrictive (PSA's levels), into DIR/world/users/
  python -m systems.psa train    the LibraAlign-HF pairs relabelled per user (user_reward) and the
                         adapter trained by stage 4's loop with the UNet frozen (class PSA), into
                         DIR/psa/adapter/; sd15 reads Sage's metadata.jsonl and users.csv
                         instead (data.read_sage)

The adapter is PSA's design (its public code): in every cross-attention, zero-initialised
user key and value projections, attended beside the text,

    Attn(x) = to_out( SDPA(q, K_text, V_text) + s · SDPA(q, to_k_user(u), to_v_user(u)) )

with the user tokens u = LayerNorm(P · e) from the profile vector e, appended to the text
embeddings and split off inside the processor. The negative branch of classifier-free
guidance uses the tokens of a zero profile vector. to_out is linear, so the text branch is
diffusers' own AttnProcessor2_0 and the user branch adds to_out's weight times its SDPA: a
fresh adapter (zero value projections) leaves the base model's output unchanged bit for bit.
With one user token, attention over one key is 1 and to_k_user has no effect (PSA's default).
The toy preset departs from PSA in two measured ways (docs/psa.md, Diagnosis): its query
reads the text branch's output, q_u = to_q(h + to_out(SDPA(q, K_text, V_text))) (--psa-query
text), and it has eight user tokens; and, as Sage's pairs, it trains on the pairs of the seven
categories only.

Profile vectors: sd15 embeds the profile text with an LLM (PSA: Qwen2.5-7B-Instruct, the masked
sum of its last hidden states), frozen. The toy world has no LLM, so a small transformer reads
the profile TEXT (tokens of CLIP's tokenizer) and is trained with the adapter: it must learn
the boundary from the words, never from a vector of the banned set.
"""
import argparse
import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lib import data as D
from lib import models as M
from lib import toyworld as W
from lib import utils as U

CATEGORIES = tuple(W.HARM)

# ---------------------------------------------------------------------------------------
# Users: attributes, and the written rules that turn them into banned categories
# ---------------------------------------------------------------------------------------

GENDERS = ("female", "male")
RELIGIONS = ("none", "christian", "muslim", "hindu", "buddhist", "jewish")
PHYSICAL = ("healthy", "pregnant", "heart condition", "visually impaired")
MENTAL = ("stable", "anxiety", "depression", "ptsd")

# The rules, as PSA writes them for its LLM; each (condition in words, test, categories banned)
RULES = (
    ("under 13: a child", lambda u: u["age"] < 13, CATEGORIES),
    ("13 to 17: a minor", lambda u: 13 <= u["age"] < 18,
     ("sexual", "violence", "self-harm", "shocking", "illegal activity")),
    ("an unstable mental condition", lambda u: u["mental_condition"] in ("anxiety", "depression"),
     ("self-harm", "violence", "shocking")),
    ("post-traumatic stress", lambda u: u["mental_condition"] == "ptsd",
     ("violence", "shocking", "harassment", "self-harm")),
    ("a religion", lambda u: u["religion"] != "none", ("sexual",)),
    ("pregnant or a heart condition", lambda u: u["physical_condition"] in ("pregnant", "heart condition"),
     ("shocking", "violence")),
    ("65 or older", lambda u: u["age"] >= 65, ("shocking",)),
    # the toy's own: Sage's profiles have attributes only, and no attribute rule bans violence,
    # hate, harassment, self-harm or illegal activity alone; a stated dislike gives users who do
    *((f"asks not to see {c}", lambda u, c=c: u["avoids"] == c, (c,)) for c in CATEGORIES),
)

# Six fixed users from permissive to restrictive, banning 0, 2, 4, 4, 5 and 7 categories
REFERENCE_USERS = (
    dict(age=30, gender="female", religion="none", physical_condition="healthy", mental_condition="stable"),
    dict(age=70, gender="male", religion="christian", physical_condition="healthy", mental_condition="stable"),
    dict(age=40, gender="female", religion="muslim", physical_condition="healthy", mental_condition="anxiety"),
    dict(age=28, gender="female", religion="none", physical_condition="pregnant", mental_condition="ptsd"),
    dict(age=15, gender="male", religion="none", physical_condition="healthy", mental_condition="stable"),
    dict(age=10, gender="female", religion="none", physical_condition="healthy", mental_condition="stable"),
)
LEVELS = tuple(str(i) for i in range(len(REFERENCE_USERS)))


def banned_categories(user: dict) -> list[str]:
    """The union of the categories every rule that applies to the user bans, in I2P's order."""
    banned = {c for _, applies, cats in RULES if applies(user) for c in cats}
    return [c for c in CATEGORIES if c in banned]


def profile_text(user: dict) -> str:
    """The text PSA embeds: the profile, the dislike in the user's words (if any), then its
    banned and allowed lists."""
    banned = user["banned"]
    allowed = [c for c in CATEGORIES if c not in banned]
    said = f' In their words: "I do not want to see {user["avoids"]} images."' if user["avoids"] else ""
    return (f"User profile: age {user['age']}, {user['gender']}, religion {user['religion']}, physical condition "
            f"{user['physical_condition']}, mental condition {user['mental_condition']}.{said} Banned categories: "
            f"{', '.join(banned) or 'none'}. Allowed categories: {', '.join(allowed) or 'none'}.")


def make_user(uid: str, attributes: dict) -> dict:
    """A user of the attributes (avoids: none unless given), its banned list and its text."""
    user = {"id": uid, "avoids": None, **attributes}
    user["banned"] = banned_categories(user)
    user["text"] = profile_text(user)
    return user


def random_user(rng: random.Random, uid: str, avoids: str | None = None) -> dict:
    """A user drawn so that every rule fires often: ages from children to the old. One who
    avoids a category is an adult no other rule restricts: that category is all it bans."""
    if avoids is not None:
        return make_user(uid, dict(REFERENCE_USERS[0], age=rng.randint(18, 64), gender=rng.choice(GENDERS),
                                   avoids=avoids))
    age = rng.choice([rng.randint(8, 12), rng.randint(13, 17), rng.randint(18, 64), rng.randint(18, 64),
                      rng.randint(65, 85)])
    return make_user(uid, dict(age=age, gender=rng.choice(GENDERS),
                               religion=rng.choice(("none",) * 5 + RELIGIONS[1:]),
                               physical_condition=rng.choice(("healthy",) * 5 + PHYSICAL[1:]),
                               mental_condition=rng.choice(("stable",) * 5 + MENTAL[1:])))


# Every third user of a split asks not to see one category, the seven in turn, and nothing else
# restricts it: no attribute rule bans violence, hate, harassment, self-harm or illegal activity
# alone, so without these users no split would hold a user banning just one of them
SINGLE_EVERY = 3


def simulate_users(n_train: int, n_heldout: int, seed: int) -> dict[str, list[dict]]:
    """{"train", "heldout", "reference"}: drawn users (ids distinct across the splits) and the
    six fixed reference users."""
    rng = random.Random(seed * 7919 + 17)
    avoids = lambda i: CATEGORIES[i // SINGLE_EVERY % len(CATEGORIES)] if i % SINGLE_EVERY == 0 else None
    return {"train": [random_user(rng, f"user-{i:05d}", avoids(i)) for i in range(n_train)],
            "heldout": [random_user(rng, f"user-{n_train + i:05d}", avoids(i)) for i in range(n_heldout)],
            "reference": [make_user(f"level-{i}", u) for i, u in enumerate(REFERENCE_USERS)]}


def single_bans(users: list[dict]) -> dict[str, int]:
    """{category: how many of the users ban it and nothing else}."""
    return {c: sum(u["banned"] == [c] for u in users) for c in CATEGORIES}


USER_FIELDS = ("id", "age", "gender", "religion", "physical_condition", "mental_condition", "banned", "text")


def read_users(path: Path) -> list[dict]:
    """A users JSONL (stage 0's); a row without a field, or banning or avoiding an unknown
    category, stops the run naming the row. `avoids` is optional: a table without it (one
    written before it existed, or of your own) reads as avoids none."""
    users = []
    for n, row in U.iter_jsonl(path):
        missing = [k for k in USER_FIELDS if k not in row]
        if missing:
            raise U.DataError(f"{path}:{n}: missing {missing}")
        unknown = sorted(set(row["banned"]) - set(CATEGORIES))
        if unknown:
            raise U.DataError(f"{path}:{n}: unknown banned categories {unknown} (categories: {list(CATEGORIES)})")
        row.setdefault("avoids", None)
        if row["avoids"] not in (None, *CATEGORIES):
            raise U.DataError(f"{path}:{n}: avoids {row['avoids']!r}, not a category (categories: "
                              f"{list(CATEGORIES)})")
        users.append(row)
    if not users:
        raise U.DataError(f"{path}: no users")
    return users


# ---------------------------------------------------------------------------------------
# Per-user preferences: R_u(x) = r(x) + w_f·fid_u(x) − λ_u,k·C(x)
# ---------------------------------------------------------------------------------------

def concept_shown(image, category: str) -> bool:
    """Exact in the toy world: the category's harm colour covers at least the judge's
    severity-1 area (toyworld.SEVERITY_THRESHOLDS)."""
    return W.harm_extents(image)[category] >= W.SEVERITY_THRESHOLDS[0]


def banned_shown(image, banned) -> bool:
    extents = W.harm_extents(image)
    return any(extents[c] >= W.SEVERITY_THRESHOLDS[0] for c in banned)


def user_reward(quality: float, cost: float, shows_concept: bool, category: str | None, banned, lam_banned: float,
                fidelity: float) -> float:
    """R_u(x) = r(x) + w_f·fid_u(x) − λ_u,k·C(x) for an image of a prompt of harm category k:
    λ_u,k = lam_banned when the user bans k, else 0; fid_u(x) = 1 when k is allowed and the
    image shows the requested concept. (The toy quality reward ignores harm pixels, so
    fidelity to an allowed concept must be rewarded explicitly.) Benign prompts: R = r."""
    if category is None:
        return quality
    if category in banned:
        return quality - lam_banned * cost
    return quality + fidelity * float(shows_concept)


def relabel_for_users(pairs: list[dict], users: list[dict], per_pair: int, lam_banned: float, fidelity: float,
                      seed: int) -> list[dict]:
    """Each pair with `per_pair` users drawn for it (seeded), ordered by R_u (Eq. 8 with the
    user's reward); ties are dropped. A pair's sides carry quality, cost and shows_concept."""
    rng = random.Random(seed)
    out = []
    for i, p in enumerate(pairs):
        for u in rng.sample(range(len(users)), min(per_pair, len(users))):
            banned, cat = users[u]["banned"], p.get("category")
            ra, rb = (user_reward(p[s]["quality"], p[s]["cost"], p[s]["shows_concept"], cat, banned, lam_banned,
                                  fidelity) for s in ("a", "b"))
            if ra == rb:
                continue
            w, l = ("a", "b") if ra > rb else ("b", "a")
            out.append({**p, "w": p[w], "l": p[l], "user": u, "pair": i})
    return out


# ---------------------------------------------------------------------------------------
# Profile vectors: a small text encoder (toy, trained) or an LLM (sd15, frozen)
# ---------------------------------------------------------------------------------------

PROFILE_TOKENS = 64  # the longest toy profile is 61 tokens (checked when tokenized)


def tokenize_profiles(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP token ids and attention mask of each profile text, padded to PROFILE_TOKENS."""
    tok = M.clip_tokenizer(PROFILE_TOKENS)
    enc = tok(texts, padding="max_length", max_length=PROFILE_TOKENS, truncation=False, return_tensors="pt")
    if enc.input_ids.shape[1] > PROFILE_TOKENS:
        raise U.DataError(f"a profile text is longer than {PROFILE_TOKENS} tokens")
    return enc.input_ids, enc.attention_mask


class ToyProfileEncoder(torch.nn.Module):
    """A one-layer transformer over the profile's tokens; the vector is the masked sum of its
    last hidden states, as PSA takes the LLM's."""

    def __init__(self, dim: int = 32, vocab: int = 49408):
        super().__init__()
        self.dim = dim
        self.tokens = torch.nn.Embedding(vocab, dim)
        self.positions = torch.nn.Embedding(PROFILE_TOKENS, dim)
        self.layer = torch.nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0,
                                                      batch_first=True)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids) + self.positions.weight[: ids.shape[1]]
        h = self.layer(h, src_key_padding_mask=mask == 0)
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # masked mean: a sum scaled by length


@torch.no_grad()
def llm_profile_vectors(model_name: str, texts: list[str], device, batch: int = 8) -> torch.Tensor:
    """sd15: the frozen LLM's masked sum of last hidden states per profile text [U, hidden]
    (PSA: Qwen2.5-7B-Instruct, hidden 3584), via transformers from_pretrained."""
    from transformers import AutoModel, AutoTokenizer
    tok = M.from_pretrained_or_exit(AutoTokenizer.from_pretrained, model_name, "the profile LLM", "--psa-llm")
    llm = M.from_pretrained_or_exit(AutoModel.from_pretrained, model_name, "the profile LLM", "--psa-llm")
    llm.eval().to(device)
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding=True, return_tensors="pt").to(device)
        h = llm(**enc).last_hidden_state
        out.append((h * enc.attention_mask[..., None]).sum(1).float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------
# The adapter: user tokens, and user keys and values in every cross-attention
# ---------------------------------------------------------------------------------------

class UserAttnProcessor(torch.nn.Module):
    """A cross-attention (attn2) processor: diffusers' AttnProcessor2_0 on the text tokens,
    plus s · to_out.weight · SDPA(q, to_k_user(u), to_v_user(u)) on the last `num_tokens`
    tokens of encoder_hidden_states. With `enabled` False the user tokens are ignored: the
    base model (the frozen reference of PSA's DPO)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int, scale: float = 1.0,
                 query: str = "hidden"):
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0
        self.text_processor = AttnProcessor2_0()
        self.num_tokens, self.scale, self.enabled, self.query = num_tokens, scale, True, query
        self.to_k_user = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_user = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)
        torch.nn.init.zeros_(self.to_k_user.weight)
        torch.nn.init.zeros_(self.to_v_user.weight)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if hidden_states.ndim != 3 or attn.residual_connection or attn.rescale_output_factor != 1.0:
            raise ValueError("UserAttnProcessor supports SD's cross-attention (3-d states, no residual, no rescale)")
        text, user = encoder_hidden_states[:, :-self.num_tokens], encoder_hidden_states[:, -self.num_tokens:]
        out = self.text_processor(attn, hidden_states, text, attention_mask, temb)
        if not self.enabled:
            return out
        b, heads = hidden_states.shape[0], attn.heads
        q = attn.to_q(hidden_states if self.query == "hidden" else hidden_states + out)
        split = lambda x: x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)
        u = F.scaled_dot_product_attention(split(q), split(self.to_k_user(user)), split(self.to_v_user(user)))
        u = u.transpose(1, 2).reshape(b, -1, q.shape[-1]).to(q.dtype)
        return out + self.scale * F.linear(u, attn.to_out[0].weight)  # to_out is linear: its bias is in `out` once


class PSAAdapter(torch.nn.Module):
    """The trainable part of PSA: (toy) the profile encoder, the projection of a profile vector
    to user tokens, and the user projections of every cross-attention, by processor name."""

    def __init__(self, unet, profile_dim: int, num_tokens: int = 1, scale: float = 1.0, toy_encoder: bool = True,
                 query: str = "hidden"):
        super().__init__()
        cross = unet.config.cross_attention_dim
        self.config = {"profile_dim": profile_dim, "num_tokens": num_tokens, "scale": scale,
                       "toy_encoder": toy_encoder, "cross_attention_dim": cross, "query": query}
        self.encoder = ToyProfileEncoder(profile_dim) if toy_encoder else None
        # the population's mean and spread of profile vectors (standardize): profiles differ in a
        # few words of a long shared template, so raw vectors differ by little next to their mean
        self.register_buffer("population_mean", torch.zeros(profile_dim))
        self.register_buffer("population_std", torch.ones(profile_dim))
        self.proj = torch.nn.Linear(profile_dim, num_tokens * cross)
        self.norm = torch.nn.LayerNorm(cross)
        self.processors = torch.nn.ModuleDict()
        for name, proc in unet.attn_processors.items():
            if ".attn2." in name:
                attn = unet.get_submodule(name.removesuffix(".processor"))
                self.processors[name.replace(".", "__")] = UserAttnProcessor(attn.to_q.out_features, cross,
                                                                             num_tokens, scale, query)

    def install(self, unet) -> None:
        """Set these processors on the UNet's cross-attentions (stock ones elsewhere)."""
        from diffusers.models.attention_processor import AttnProcessor2_0
        unet.set_attn_processor({name: self.processors[name.replace(".", "__")] if ".attn2." in name
                                 else AttnProcessor2_0() for name in unet.attn_processors})

    def profile_vectors(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """toy: the encoder's vectors of profile texts (sd15's come from the LLM)."""
        return self.encoder(ids, mask)

    def standardize(self, vectors: torch.Tensor, fit: bool = False) -> torch.Tensor:
        """(e − μ) / σ per feature. fit=True takes μ, σ from `vectors`, the whole training
        population (so every process of a data-parallel run uses the same ones), and keeps
        them for later users; otherwise the kept ones are used."""
        if fit:
            mean, std = vectors.mean(0), vectors.std(0) + 1e-6
            self.population_mean.copy_(mean.detach())
            self.population_std.copy_(std.detach())
        else:
            mean, std = self.population_mean, self.population_std
        return (vectors - mean) / std

    def user_tokens(self, vectors: torch.Tensor) -> torch.Tensor:
        """[U, D] standardized profile vectors -> [U, num_tokens, cross_attention_dim] tokens."""
        n, cross = self.config["num_tokens"], self.config["cross_attention_dim"]
        return self.norm(self.proj(vectors).view(len(vectors), n, cross))

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".psa_adapter.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(folder / "psa_adapter.safetensors")
        U.atomic_write_json(folder / "adapter_config.json", self.config)


def load_adapter(folder: Path, unet) -> PSAAdapter:
    """The adapter saved by PSAAdapter.save, for this UNet (installed on it)."""
    from safetensors.torch import load_file
    U.require_inputs([folder / "psa_adapter.safetensors", folder / "adapter_config.json"], "psa")
    cfg = U.read_json(folder / "adapter_config.json")
    adapter = PSAAdapter(unet, cfg["profile_dim"], cfg["num_tokens"], cfg["scale"], cfg["toy_encoder"],
                         cfg.get("query", "hidden"))  # an adapter saved before --psa-query: PSA's
    adapter.load_state_dict(load_file(str(folder / "psa_adapter.safetensors")))
    adapter.install(unet)
    return adapter.eval()


class UserConditionedUNet(torch.nn.Module):
    """The UNet as Diffusion-DPO calls it, net(x_t, t, emb).sample, where emb is the text
    embeddings with the user tokens appended. reference=True switches the user branches off
    for the call: the base model, PSA's frozen reference."""

    def __init__(self, unet, adapter: "PSAAdapter", reference: bool = False):
        super().__init__()
        self.unet, self.processors, self.reference = unet, list(adapter.processors.values()), reference

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, x, t, emb):
        for p in self.processors:
            p.enabled = not self.reference
        try:
            return self.unet(x, t, encoder_hidden_states=emb)
        finally:
            for p in self.processors:
                p.enabled = True


@torch.no_grad()
def generate_for_user(pipe, adapter: PSAAdapter, tokens: torch.Tensor, prompts, seeds, steps: int,
                      guidance: float, batch_size: int, size: int | None = None) -> list[np.ndarray]:
    """Images of a stock pipeline (the adapter installed on its UNet) for one user: the user's
    tokens appended to the prompt embeddings, a zero profile's (the population's mean, once
    standardized) to the negative ones."""
    zero = adapter.user_tokens(torch.zeros(1, adapter.config["profile_dim"], device=tokens.device))
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        pos, neg = pipe.encode_prompt(chunk, pipe.device, 1, True, [""] * len(chunk))
        n = len(chunk)
        pos = torch.cat([pos, tokens.to(pos.dtype).expand(n, -1, -1)], dim=1)
        neg = torch.cat([neg, zero.to(neg.dtype).expand(n, -1, -1)], dim=1)
        out.extend(M.generate(pipe, None, seeds[i:i + batch_size], steps, guidance, batch_size, size,
                              prompt_embeds=pos, negative_prompt_embeds=neg))
    return out


# ---------------------------------------------------------------------------------------
# Training through stage 4's loop: what PSA changes in it, and the commands
# ---------------------------------------------------------------------------------------

S4 = U.load_script("04_train_spo.py")


@dataclasses.dataclass
class Profiles:
    """The training users' profile inputs (toy: token ids its encoder reads; sd15: frozen LLM
    vectors) and each example's user."""
    user_of: torch.Tensor            # [examples] the user of each relabelled pair
    ids: torch.Tensor | None = None  # toy: [users, L] profile token ids, and their mask
    mask: torch.Tensor | None = None
    vectors: torch.Tensor | None = None  # sd15: [users, D]


class PSA(S4.SPO):
    """Stage 4's loop for PSA: pairs ordered per user by R_u, the UNet frozen and the adapter
    trained, each pair conditioned on its user's tokens; the adapter is what is saved."""
    final = "adapter/psa_adapter.safetensors"

    def pairs(self, args, hf: Path):
        """Sage's per-user pairs (--sage), or the LibraAlign-HF pairs relabelled for drawn
        training users by R_u (relabel_for_users)."""
        if args.sage:
            self.users, pairs = D.read_sage(Path(args.sage))
            index = {u["id"]: i for i, u in enumerate(self.users)}
            return [{**p, "user": index[p["user"]]} for p in pairs], dict(pairs_dropped=0, bad_rows_skipped=0)
        users_file = Path(args.psa_train_users) if args.psa_train_users else U.stage_dir(args.run, "users") / "train.jsonl"
        if args.psa_train_users and not users_file.exists():
            raise U.DataError(f"--psa-train-users {users_file}: file not found")
        U.require_inputs([users_file, hf / "hf_pairs.jsonl"], "users")
        self.users = read_users(users_file)
        raw, n_bad = D.load_hf_pairs(hf / "hf_pairs.jsonl", args.skip_bad)
        # Sage's pairs all lie within a harm category; LibraAlign-HF's benign pairs order two
        # safe images by quality, the same for every user: no boundary to learn, half the examples
        n_benign = sum(not p.get("category") for p in raw)
        raw = raw if args.psa_benign_pairs else [p for p in raw if p.get("category")]
        for p in raw:
            for s in ("a", "b"):  # is the concept asked for shown? exact on the toy; sd15: the harmful side
                shown = concept_shown(U.load_png(p[s]["file"]), p["category"]) if args.preset == "toy" and p.get(
                    "category") else p[s]["role"] == "harmful"
                p[s]["shows_concept"] = bool(shown)
        examples = relabel_for_users(raw, self.users, args.psa_users_per_pair, args.psa_lam_banned,
                                     args.psa_fidelity, args.seed)
        if not examples:
            raise U.DataError(f"{hf / 'hf_pairs.jsonl'}: no pair is ordered by any user's reward")
        return examples, {"pairs_dropped": len(raw) * args.psa_users_per_pair - len(examples), "bad_rows_skipped": n_bad,
                          "benign_pairs_left_out": 0 if args.psa_benign_pairs else n_benign}

    def models(self, args, device):
        """Stage 4's models with the UNet frozen and no reference copy: the adapter trains."""
        return M.load_training_models(args, device, frozen_unet=True)

    def trainable(self, tr):
        """The adapter installed on the frozen UNet; the policy is the UNet with it, the
        reference the same UNet with its user branches off."""
        args, device, texts = tr.args, tr.dist.device, [u["text"] for u in self.users]
        toy = args.psa_llm is None
        vectors = None if toy else llm_profile_vectors(args.psa_llm, texts, device)
        self.adapter = PSAAdapter(tr.unet, args.psa_profile_dim if toy else vectors.shape[1], args.psa_tokens,
                                  args.psa_scale, toy_encoder=toy, query=args.psa_query).to(device)
        self.adapter.install(tr.unet)
        ids, mask = tokenize_profiles(texts) if toy else (None, None)
        self.profiles = Profiles(torch.tensor([e["user"] for e in tr.pairs]), ids, mask, vectors)
        tr.unet, tr.ref = UserConditionedUNet(tr.unet, self.adapter), UserConditionedUNet(tr.unet, self.adapter, True)
        return list(self.adapter.parameters())

    def condition(self, tr, ids, emb):
        """Each pair's user tokens appended to its text embeddings: every training user's
        profile vector, standardized over them all, then those of the pairs' users."""
        prof, dev = self.profiles, tr.dist.device
        every = (prof.vectors.to(dev) if prof.vectors is not None
                 else self.adapter.profile_vectors(prof.ids.to(dev), prof.mask.to(dev)))
        tokens = self.adapter.user_tokens(self.adapter.standardize(every, fit=True)[prof.user_of[ids]])
        return torch.cat([emb, tokens], dim=1)

    def figures(self, tr, ids, d_theta, d_ref):
        """T2I-SPO's figures, and the implicit accuracy split by what each pair teaches its user."""
        split = self.user_accuracy(tr, ids, d_theta, d_ref)
        return {**super().figures(tr, ids, d_theta, d_ref), **split}

    def user_accuracy(self, tr, ids, d_theta, d_ref) -> dict:
        """Implicit accuracy split by the pair's kind for its user: a harmful prompt of a
        category the user bans, one it allows, and benign (or Sage's) prompts."""
        won, groups = (d_theta < d_ref).float(), {"banned": [], "allowed": [], "benign": []}
        for k, i in enumerate(ids):
            cat = tr.pairs[i].get("category")
            groups["benign" if cat is None else "banned" if cat in self.users[tr.pairs[i]["user"]]["banned"]
                   else "allowed"].append(k)
        return {f"implicit_accuracy_{g}": won[ks].mean().item() for g, ks in groups.items() if ks}

    def state(self, tr):
        return self.adapter.state_dict()

    def load_state(self, tr, state):
        self.adapter.load_state_dict(state)

    def save(self, tr):
        self.adapter.save(tr.out / "adapter")

    def publish(self, tr):
        """No model.json: evaluated per user by systems/psa_eval.py, not as one more model of
        the tables."""


U.PRESETS["toy"]["psa"] = dict(
    U.PRESETS["toy"]["spo"], objective="psa", dfm="off", dpop=0.0, lr=5e-3, steps=1600, psa_users_per_pair=4,
    psa_lam_banned=10.0, psa_fidelity=2.0, psa_tokens=8, psa_scale=1.0, psa_profile_dim=32, psa_llm=None, sage=None,
    psa_train_users=None, psa_query="text", psa_benign_pairs=False,
    threads=2)  # the toy's: `make psa` trains the adapter alone on 2 cores (utils.use_threads)
U.PRESETS["sd15"]["psa"] = dict(  # PSA's: one user token, the query from the hidden states
    U.PRESETS["sd15"]["spo"], objective="psa", dfm="off", psa_users_per_pair=4, psa_lam_banned=10.0, psa_fidelity=0.0,
    psa_tokens=1, psa_scale=1.0, psa_profile_dim=32, psa_llm="Qwen/Qwen2.5-7B-Instruct", sage=None,
    psa_train_users=None, psa_query="hidden", psa_benign_pairs=False)
U.TINY["psa"] = dict(U.TINY["spo"], psa_users_per_pair=2, threads=0)


def train_parser():
    p = S4.parser("psa", "PSA: the user-conditioned adapter, trained by stage 4's loop on per-user preferences")
    p.add_argument("--psa-users-per-pair", type=int, help="training users drawn for each pair")
    p.add_argument("--psa-lam-banned", type=float, help="λ_u,k of R_u for a category the user bans")
    p.add_argument("--psa-fidelity", type=float,
                   help="w_f, the reward of showing an allowed concept asked for (toy: its quality reward ignores "
                        "harm pixels; sd15: 0, PickScore measures fidelity)")
    p.add_argument("--psa-benign-pairs", action=argparse.BooleanOptionalAction,
                   help="also train on LibraAlign-HF's benign pairs (two safe images ordered by quality for every "
                        "user); off: the pairs of the seven categories only, as Sage's (docs/psa.md, Diagnosis)")
    p.add_argument("--psa-tokens", type=int, help="user tokens per profile")
    p.add_argument("--psa-scale", type=float, help="s, the weight of the user branch")
    p.add_argument("--psa-query", choices=["hidden", "text"],
                   help="the user branch's query: to_q(h), PSA's; or to_q(h + the text branch's output), which "
                        "knows what the prompt asks for at each position (docs/psa.md, Diagnosis)")
    p.add_argument("--psa-profile-dim", type=int, help="toy: the profile encoder's width")
    p.add_argument("--psa-llm", help="sd15: the LLM embedding profile texts (masked sum of last hidden states)")
    p.add_argument("--psa-train-users", help="the training users' JSONL (psa.read_users; default DIR/world/users/train.jsonl)")
    p.add_argument("--sage", help="sd15: Sage's folder (metadata.jsonl, users.csv, images) instead of --data")
    return p


def train_main(args) -> None:
    if args.dfm == "on":  # before any work: PSA's loop has no descent rates
        raise SystemExit("systems/psa.py train runs without DFM: pass --dfm off")
    old = Path(args.run) / (args.name or "psa") / "config.json"
    if old.exists() and "psa_benign_pairs" not in U.read_json(old) and not args.psa_benign_pairs:
        raise SystemExit(f"{old.parent} was trained with LibraAlign-HF's benign pairs too (before "
                         f"--psa-benign-pairs existed): pass --psa-benign-pairs to resume it, or write elsewhere "
                         f"with --name NAME")
    S4.train(args, PSA())


U.PRESETS["toy"]["users"] = dict(n_users=200, n_heldout_users=40)
U.PRESETS["sd15"]["users"] = dict(U.PRESETS["toy"]["users"])
U.TINY["users"] = dict(n_users=16, n_heldout_users=4)


def users_parser():
    p = U.stage_parser("users", "PSA's simulated users (toy): train, held-out and the six reference users")
    p.add_argument("--n-users", type=int, help="simulated training users: profiles and their banned categories")
    p.add_argument("--n-heldout-users", type=int, help="simulated users held out for PSA's evaluation")
    return p


def users_main(args) -> None:
    folder = U.stage_dir(args.run, "users")
    for split, users in simulate_users(args.n_users, args.n_heldout_users, args.seed).items():
        U.write_jsonl(folder / f"{split}.jsonl", users)
        U.log(f"{split}: {len(users)} users; banning one category alone: {single_bans(users)}")
    U.log(f"users in {folder}")


COMMANDS = {"users": (users_parser, users_main), "train": (train_parser, train_main)}

if __name__ == "__main__":
    U.run_commands(COMMANDS, __doc__)
