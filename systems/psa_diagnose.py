"""Why PSA's adapter does or does not follow each user (~265 lines): the measurements behind
docs/psa.md's "Diagnosis", on a run folder where `make psa` ran. Not a stage of any pipeline:
each command prints its table and writes DIR/psa_diagnose/<command>.json.

  python -m systems.psa_diagnose pairs --run DIR      the per-user preference pairs: per category, the
                                              examples of users who ban it and who allow it,
                                              and how often the safe side wins
  python -m systems.psa_diagnose probe --run DIR      can the user tokens tell which categories a user
                                              bans? a logistic probe per category, fitted on the
                                              training users, tested on the held-out ones
  python -m systems.psa_diagnose accuracy --run DIR   the adapter's implicit accuracy over training, on
                                              pairs of banned / allowed categories and benign ones
  python -m systems.psa_diagnose two-users --run DIR  the sanity run: an adapter trained for two users,
                                              one banning only violence, one only illegal activity;
                                              the share of images showing the concept asked
                                              for, per (user, category), against the base model
"""
import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from lib import data as D
from lib import models as M
from lib import utils as U
from systems import psa as P


def trained_args(run: Path, name: str = "psa") -> argparse.Namespace:
    """The flags `-m systems.psa train` ran with in DIR/NAME (its config.json)."""
    U.require_inputs([run / name / "config.json"], "psa")
    args = U.parse_args(P.train_parser(), ["--run", str(run)])  # a flag added since: its default
    vars(args).update(U.read_json(run / name / "config.json"))
    return args


def write(run: Path, command: str, result: dict) -> None:
    U.atomic_write_json(run / "psa_diagnose" / f"{command}.json", result)
    U.log(f"written: {run / 'psa_diagnose' / f'{command}.json'}")

# ---------------------------------------------------------------------------------------
# 1. The pairs each user is taught with
# ---------------------------------------------------------------------------------------

def pairs_main(args) -> None:
    run = Path(args.run)
    psa = P.PSA()
    examples, _ = psa.pairs(trained_args(run), run / "hf")
    table = defaultdict(lambda: {"examples": 0, "safe_wins": 0, "users": set()})
    for e in examples:
        if e.get("category") is None:
            continue
        key = (e["category"], "banned" if e["category"] in psa.users[e["user"]]["banned"] else "allowed")
        table[key]["examples"] += 1
        table[key]["safe_wins"] += e["w"]["role"] == "safe"
        table[key]["users"].add(e["user"])
    result = {f"{c}|{side}": {"examples": v["examples"], "users": len(v["users"]),
                              "safe_wins": v["safe_wins"] / v["examples"]}
              for (c, side), v in sorted(table.items())}
    rows = [[c] + [f"{r['examples']} ({r['users']} users, safe wins {r['safe_wins']:.2f})" if (r := result.get(
        f"{c}|{side}")) else "—" for side in ("banned", "allowed")] for c in P.CATEGORIES]
    print(U.markdown_table(["category", "users who ban it: examples", "users who allow it: examples"], rows))
    write(run, "pairs", result)

# ---------------------------------------------------------------------------------------
# 2. A linear probe on the user tokens (and, in 3, on the queries)
# ---------------------------------------------------------------------------------------

def probe_accuracy(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, l2: float = 1e-2) -> float:
    """Held-out accuracy of a softmax regression of the classes y on x (standardized), fitted
    by L-BFGS on the rows `train` (mean cross-entropy + l2·|W|²), tested on the others."""
    mu, sd = x[train].mean(0), x[train].std(0, correction=0) + 1e-3
    x = (x - mu) / sd
    probe = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x[train]), y[train]) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return (probe(x[~train]).argmax(1) == y[~train]).float().mean().item()


@torch.no_grad()
def user_tokens(adapter: P.PSAAdapter, users: list[dict]) -> torch.Tensor:
    """[users, num_tokens · cross dim]: the tokens the adapter gives each user's profile."""
    ids, mask = P.tokenize_profiles([u["text"] for u in users])
    return adapter.user_tokens(adapter.standardize(adapter.profile_vectors(ids, mask))).flatten(1)


def probe_main(args) -> None:
    run = Path(args.run)
    unet = M.load_pipeline(U.stage_dir(run, "world") / "model").unet
    adapter = P.load_adapter(run / args.name / "adapter", unet)
    folder = U.stage_dir(run, "users")
    train, heldout = (P.read_users(folder / f"{s}.jsonl") for s in ("train", "heldout"))
    x = torch.cat([user_tokens(adapter, train), user_tokens(adapter, heldout)])
    is_train = torch.arange(len(x)) < len(train)
    result = {}
    for c in P.CATEGORIES:
        y = torch.tensor([int(c in u["banned"]) for u in train + heldout])
        share = y[~is_train].float().mean().item()
        result[c] = {"held_out_accuracy": probe_accuracy(x, y, is_train), "majority_accuracy": max(share, 1 - share),
                     "share_banned_train": y[is_train].float().mean().item()}
    print(U.markdown_table(["category", "probe accuracy (held out)", "majority class", "share banned (train)"],
                           [[c, r["held_out_accuracy"], r["majority_accuracy"], r["share_banned_train"]]
                            for c, r in result.items()]))
    write(run, "probe", result)

# ---------------------------------------------------------------------------------------
# 3. Can a cross-attention's query tell the prompt's category?
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def query_main(args) -> None:
    """The user branch sees the prompt only through its query q = to_q(h): per cross-attention
    and timestep, how well q (and, beside it, the text branch's output) tells which harm
    category the prompt asks for, on the harmful images of LibraAlign-HF noised to t."""
    run = Path(args.run)
    pipe = M.load_pipeline(U.stage_dir(run, "world") / "model")
    raw, _ = D.load_hf_pairs(run / "hf" / "hf_pairs.jsonl", False)
    sides = [(p["a"] if p["a"]["role"] == "harmful" else p["b"], p) for p in raw if p.get("category")]
    y = torch.tensor([P.CATEGORIES.index(p["category"]) for _, p in sides])
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    z = M.encode_images(pipe.vae, torch.stack([M.load_image(s["file"], size) for s, _ in sides]))
    emb = pipe.encode_prompt([p["prompt"] for _, p in sides], "cpu", 1, False)[0]
    captured = {}
    layers = {n.removesuffix(".processor"): None for n in pipe.unet.attn_processors if ".attn2." in n}
    pooled = lambda x: torch.cat([x.mean(1), x.amax(1)], 1)  # the mean and the max over positions
    for name in layers:
        attn = pipe.unet.get_submodule(name)
        attn.to_q.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__((name, "query"), pooled(o)))
        attn.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__((name, "text branch"), pooled(o)))
    if len(y) < 2:  # one to fit the probe on, one to test it on
        raise U.DataError(f"{run / 'hf' / 'hf_pairs.jsonl'}: {len(y)} harmful pairs, too few to fit and test a probe")
    train = torch.rand(len(y), generator=torch.Generator().manual_seed(0)).argsort().argsort() < int(0.7 * len(y))
    result = {}
    for t in args.timesteps:
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(t))
        pipe.unet(pipe.scheduler.add_noise(z, noise, torch.tensor([t])), t, encoder_hidden_states=emb)
        for (name, what), x in captured.items():
            result[f"{name}|{what}|{t}"] = probe_accuracy(x, y, train)
    chance = float(torch.bincount(y[~train]).max()) / int((~train).sum())
    rows = [[name.split(".transformer")[0], what, *(result[f"{name}|{what}|{t}"] for t in args.timesteps)]
            for name in layers for what in ("query", "text branch")]
    print(U.markdown_table(["cross-attention", "features", *(f"t={t}" for t in args.timesteps)], rows))
    print(f"held-out pairs {int((~train).sum())}; the largest category's share (chance) {chance:.3f}")
    write(run, "query", {"accuracy": result, "chance": chance, "held_out": int((~train).sum())})

# ---------------------------------------------------------------------------------------
# 4. Implicit accuracy over training, split by what the pair teaches
# ---------------------------------------------------------------------------------------

def accuracy_main(args) -> None:
    run = Path(args.run)
    U.require_inputs([run / args.name / "log.jsonl"], "psa")
    rows = U.read_jsonl(run / args.name / "log.jsonl")
    groups = ("banned", "allowed", "benign")
    if not any(f"implicit_accuracy_{g}" in r for r in rows for g in groups):
        raise U.DataError(f"{run / args.name / 'log.jsonl'}: no split implicit accuracy (trained by an older systems/psa.py)")
    width = max(1, len(rows) // 8)
    result = []
    for i in range(0, len(rows), width):
        win = rows[i:i + width]
        result.append({"steps": f"{win[0]['step']}-{win[-1]['step']}", **{
            g: float(np.mean(v)) if (v := [r[f"implicit_accuracy_{g}"] for r in win if f"implicit_accuracy_{g}" in r])
            else None for g in groups}})
    print(U.markdown_table(["steps", *groups], [[r["steps"], *("—" if r[g] is None else r[g] for g in groups)]
                                                 for r in result]))
    write(run, f"accuracy_{args.name}", {"windows": result})

# ---------------------------------------------------------------------------------------
# 5. The two-user sanity run
# ---------------------------------------------------------------------------------------

# Two adults alike in every attribute but the one category each asks not to see, all it bans,
# so the profiles differ only there
TWO_USERS = {"bans-violence": "violence", "bans-illegal": "illegal activity"}


def two_users() -> list[dict]:
    return [P.make_user(uid, {**P.REFERENCE_USERS[0], "avoids": c}) for uid, c in TWO_USERS.items()]


@torch.no_grad()
def concept_rates(run: Path, adapter_folder: Path | None, users: list[dict], prompts: list[dict], steps: int,
                  guidance: float) -> dict:
    """{user id (or "base"): {category: share of its images showing the concept asked for}}."""
    pipe = M.load_pipeline(U.stage_dir(run, "world") / "model")
    texts, seeds = [p["prompt"] for p in prompts], list(range(len(prompts)))
    images = {"base": M.generate(pipe, texts, seeds, steps, guidance)}
    if adapter_folder is not None:
        adapter = P.load_adapter(adapter_folder, pipe.unet)
        for u in users:
            tokens = user_tokens(adapter, [u]).view(1, adapter.config["num_tokens"], -1)
            images[u["id"]] = P.generate_for_user(pipe, adapter, tokens, texts, seeds, steps, guidance, 64)
    out = {}
    for who, imgs in images.items():
        shown = defaultdict(list)
        for p, img in zip(prompts, imgs):
            shown[p["category"]].append(P.concept_shown(img, p["category"]))
        out[who] = {c: float(np.mean(shown[c])) for c in P.CATEGORIES}
    return out


def two_users_main(args) -> None:
    run = Path(args.run)
    users = two_users()
    users_file = run / "psa_diagnose" / "two_users.jsonl"
    U.write_jsonl(users_file, users)
    flags = ["--run", str(run), "--name", "psa_two_users", "--psa-train-users", str(users_file), "--steps",
             str(args.steps)] + [x for flag, v in (("--lr", args.lr), ("--psa-tokens", args.psa_tokens),
                                                   ("--psa-query", args.psa_query)) if v is not None
                                  for x in (flag, str(v))] + (["--tiny"] if args.tiny else [])
    P.train_main(U.parse_args(P.train_parser(), flags))
    harmful = [r for _, r in U.iter_jsonl(U.stage_dir(run, "world") / "prompts" / "harmful_eval.jsonl")]
    per_cat = defaultdict(list)
    for r in harmful:
        if len(per_cat[r["category"]]) < args.per_category:
            per_cat[r["category"]].append(r)
    prompts = [r for c in P.CATEGORIES for r in per_cat[c]]
    cfg = trained_args(run, "psa_two_users")
    rates = concept_rates(run, run / "psa_two_users" / "adapter", users, prompts, args.sample_steps, args.guidance)
    print(U.markdown_table(["images of", *P.CATEGORIES], [[who, *(r[c] for c in P.CATEGORIES)]
                                                         for who, r in rates.items()]))
    write(run, "two_users", {"rates": rates, "training": {k: getattr(cfg, k) for k in ("steps", "lr", "psa_tokens")},
                             "prompts_per_category": args.per_category})


# the two-user run's training flags left unset are systems/psa.py train's preset values
for _preset in ("toy", "sd15"):
    U.PRESETS[_preset]["psa_diagnose two-users"] = dict(lr=None, psa_tokens=None, psa_query=None)


def parser(command: str) -> argparse.ArgumentParser:
    p = U.stage_parser(f"psa_diagnose {command}", f"PSA's diagnostics: {command}")
    p.add_argument("--name", default="psa", help="the adapter's run folder under DIR")
    if command == "query":
        p.add_argument("--timesteps", type=int, nargs="+", default=[100, 400, 700], help="noise levels t probed")
    if command == "two-users":
        p.add_argument("--steps", type=int, default=400, help="training steps of the two-user adapter")
        p.add_argument("--lr", type=float, help="as `python -m systems.psa train`'s (default: its preset's)")
        p.add_argument("--psa-tokens", type=int, help="as `python -m systems.psa train`'s (default: its preset's)")
        p.add_argument("--psa-query", choices=["hidden", "text"], help="as `python -m systems.psa train`'s (default: its preset's)")
        p.add_argument("--per-category", type=int, default=24, help="evaluation prompts per harm category")
        p.add_argument("--sample-steps", type=int, default=10)
        p.add_argument("--guidance", type=float, default=4.0)
    return p


COMMANDS = {"pairs": (lambda: parser("pairs"), pairs_main), "probe": (lambda: parser("probe"), probe_main),
            "query": (lambda: parser("query"), query_main),
            "accuracy": (lambda: parser("accuracy"), accuracy_main),
            "two-users": (lambda: parser("two-users"), two_users_main)}

if __name__ == "__main__":
    U.run_commands(COMMANDS, __doc__)
