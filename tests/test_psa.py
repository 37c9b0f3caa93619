"""PSA on the shared pipeline (systems/psa.py): the written rules, the users files and Sage's reader,
the per-user reward and relabelling, the exact concept verdicts, the adapter (a fresh one is
the base model bit for bit; with one user token the key projection has no effect; it saves
and loads), the LLM profile vectors, and a --tiny run through stages 0, 3, 4 and 5."""
import csv
import random

import numpy as np
import pytest
import torch

from conftest import module, stage, tiny_world_with_scm

from lib import data as D
from lib import stats
from lib import toyworld as W
from lib import utils as U
from systems import psa as P
from systems import psa_eval as PE


EV = module("05_evaluate.py")


def user(**kw):
    base = dict(age=30, gender="female", religion="none", physical_condition="healthy", mental_condition="stable")
    return P.make_user("u", {**base, **kw})


# --------------------------------------------------------------------------------------
# Users: the rules, the files
# --------------------------------------------------------------------------------------

def test_rules_ban_what_they_say_and_the_levels_grow():
    assert user()["banned"] == []
    assert user(age=10)["banned"] == list(P.CATEGORIES)
    assert user(age=15)["banned"] == ["sexual", "violence", "self-harm", "shocking", "illegal activity"]
    assert user(mental_condition="depression")["banned"] == ["violence", "self-harm", "shocking"]
    assert user(religion="hindu")["banned"] == ["sexual"]
    # the union of every rule that applies
    assert user(religion="jewish", physical_condition="pregnant")["banned"] == ["sexual", "violence", "shocking"]
    levels = P.simulate_users(0, 0, 0)["reference"]
    assert [len(u["banned"]) for u in levels] == [0, 2, 4, 4, 5, 7]
    assert levels[2]["banned"] != levels[3]["banned"]  # two different users ban four


def test_profile_text_names_the_profile_and_both_lists():
    u = user(age=70, religion="christian")
    assert u["text"] == ("User profile: age 70, female, religion christian, physical condition healthy, mental "
                         "condition stable. Banned categories: sexual, shocking. Allowed categories: violence, hate, "
                         "harassment, self-harm, illegal activity.")
    assert "Banned categories: none." in user()["text"]


def test_asking_not_to_see_a_category_bans_exactly_it_and_is_said_in_the_text():
    for c in P.CATEGORIES:
        assert user(avoids=c)["banned"] == [c]
    assert user(avoids="hate", religion="hindu")["banned"] == ["sexual", "hate"]  # the union, as every rule
    assert user(age=10, avoids="hate")["banned"] == list(P.CATEGORIES)
    assert user(avoids="violence")["text"] == (
        'User profile: age 30, female, religion none, physical condition healthy, mental condition stable. In their '
        'words: "I do not want to see violence images." Banned categories: violence. Allowed categories: sexual, '
        'hate, harassment, self-harm, shocking, illegal activity.')
    assert user()["avoids"] is None and "their words" not in user()["text"]


@pytest.mark.parametrize("seed", [0, 1])
def test_each_category_is_banned_alone_by_training_and_held_out_users(seed):
    sizes = U.PRESETS["toy"]["users"]
    users = P.simulate_users(sizes["n_users"], sizes["n_heldout_users"], seed)
    avoiding = {s: [u["avoids"] for u in users[s] if u["avoids"]] for s in ("train", "heldout")}
    # every third user of a split avoids one category, the seven in turn, and bans nothing else
    assert [avoiding["train"].count(c) for c in P.CATEGORIES] == [10, 10, 10, 10, 9, 9, 9]
    assert [avoiding["heldout"].count(c) for c in P.CATEGORIES] == [2] * 7
    assert all(u["banned"] == [u["avoids"]] for s in ("train", "heldout") for u in users[s] if u["avoids"])
    train, heldout = P.single_bans(users["train"]), P.single_bans(users["heldout"])
    assert min(train.values()) >= 9 and min(heldout.values()) >= 2
    # a religion alone bans sexual, 65 or older alone shocking: more users ban those alone
    assert train["sexual"] > 10 and train["shocking"] > 10
    ids, _ = P.tokenize_profiles([u["text"] for s in users.values() for u in s])  # each within PROFILE_TOKENS
    assert ids.shape[1] == P.PROFILE_TOKENS


def test_simulated_users_are_deterministic_and_disjoint():
    a, b = P.simulate_users(30, 10, 3), P.simulate_users(30, 10, 3)
    assert a == b and a != P.simulate_users(30, 10, 4)
    ids = [u["id"] for s in ("train", "heldout") for u in a[s]]
    assert len(ids) == len(set(ids)) == 40
    assert all(u["banned"] == P.banned_categories(u) for u in a["train"])


def test_users_file_bad_rows_are_named(tmp_path):
    good = user()
    f = tmp_path / "users.jsonl"
    U.write_jsonl(f, [good, {k: v for k, v in good.items() if k != "text"}])
    with pytest.raises(U.DataError, match=r"users.jsonl:2: missing \['text'\]"):
        P.read_users(f)
    U.write_jsonl(f, [{**good, "banned": ["nudity"]}])
    with pytest.raises(U.DataError, match=r"users.jsonl:1: unknown banned categories \['nudity'\]"):
        P.read_users(f)
    U.write_jsonl(f, [good, {**good, "avoids": "nudity"}])
    with pytest.raises(U.DataError, match=r"users.jsonl:2: avoids 'nudity', not a category"):
        P.read_users(f)


def test_users_files_without_avoids_read_as_avoiding_nothing(tmp_path):
    f = tmp_path / "users.jsonl"
    old = {k: v for k, v in user(age=70, religion="christian").items() if k != "avoids"}  # a file before `avoids`
    U.write_jsonl(f, [old, user(avoids="hate")])
    got = P.read_users(f)
    assert got[0] == {**old, "avoids": None} and got[1]["avoids"] == "hate" and got[1]["banned"] == ["hate"]


def sage_folder(tmp, rows, users):
    tmp.mkdir(exist_ok=True)
    img = np.zeros((8, 8, 3), np.uint8)
    for name in ("user_1_violence_blood_0_s.jpg", "user_1_violence_blood_0_u.jpg"):
        U.save_png(tmp / name, img)
    U.write_jsonl(tmp / "metadata.jsonl", rows)
    with open(tmp / "users.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["User_ID", "Age", "Banned_Categories", "Allowed_Categories"])
        w.writeheader()
        w.writerows(users)
    return tmp


SAGE_ROW = {"file_name": "user_1_violence_blood_0_s.jpg", "chosen": "user_1_violence_blood_0_s.jpg",
            "rejected": "user_1_violence_blood_0_u.jpg", "caption": "a knight", "user_data": {"User_ID": 1, "Age": 12}}


def test_sage_reader_reads_pairs_and_users_and_names_bad_rows(tmp_path):
    users = [{"User_ID": 1, "Age": 12, "Banned_Categories": "Violence; Sexuality", "Allowed_Categories": "Hate"}]
    folder = sage_folder(tmp_path / "ok", [SAGE_ROW], users)
    got_users, pairs = D.read_sage(folder)
    assert got_users[0]["banned"] == ["sexual", "violence"] and "Banned categories: sexual, violence." in got_users[0]["text"]
    assert pairs[0]["w"]["file"].endswith("_s.jpg") and pairs[0]["user"] == "1" and pairs[0]["prompt"] == "a knight"
    bad = sage_folder(tmp_path / "user", [SAGE_ROW, {**SAGE_ROW, "user_data": {"User_ID": 9}}], users)
    with pytest.raises(U.DataError, match=r"metadata.jsonl:2: user '9' is not in"):
        D.read_sage(bad)
    bad = sage_folder(tmp_path / "img", [{**SAGE_ROW, "rejected": "nope.jpg"}], users)
    with pytest.raises(U.DataError, match=r"metadata.jsonl:1: missing image .*nope.jpg"):
        D.read_sage(bad)
    bad = sage_folder(tmp_path / "cat", [SAGE_ROW], [{**users[0], "Banned_Categories": "Gambling"}])
    with pytest.raises(U.DataError, match=r"users.csv:2: unknown category 'Gambling'"):
        D.read_sage(bad)


# --------------------------------------------------------------------------------------
# Per-user preferences and the exact verdicts
# --------------------------------------------------------------------------------------

def scene(kind, category=None, severity=2, style=None, seed=0):
    s = W.random_scene(random.Random(seed), "benign")
    s.update(style=style)
    if kind == "harmful":
        s.update(category=category, concept=W.HARM[category][1][0], severity=severity)
    return W.render(s)


def test_concept_shown_is_exact_and_ignores_look_alikes():
    violent = scene("harmful", "violence")
    assert P.concept_shown(violent, "violence") and not P.concept_shown(violent, "sexual")
    assert P.banned_shown(violent, ["violence", "hate"]) and not P.banned_shown(violent, ["sexual"])
    paint = scene("benign", style="splashed with red paint")  # resembles violence: not it
    assert not P.concept_shown(paint, "violence") and not P.banned_shown(paint, list(P.CATEGORIES))


def side(role, quality, cost, shown):
    return {"role": role, "quality": quality, "cost": cost, "shows_concept": shown, "file": role}


def test_user_reward_by_hand():
    # banned: R = r − λC; allowed: R = r + w_f·1[shown]; benign: R = r
    assert P.user_reward(20.0, 3.0, True, "violence", ["violence"], 10.0, 2.0) == pytest.approx(-10.0)
    assert P.user_reward(20.0, 3.0, True, "violence", ["sexual"], 10.0, 2.0) == pytest.approx(22.0)
    assert P.user_reward(20.0, 3.0, False, "violence", [], 10.0, 2.0) == pytest.approx(20.0)
    assert P.user_reward(21.0, 3.0, True, None, list(P.CATEGORIES), 10.0, 2.0) == pytest.approx(21.0)


def test_relabelling_follows_each_users_boundary():
    hs = {"prompt": "p", "kind": "harmful-safe", "category": "violence",
          "a": side("harmful", 20.2, 3.0, True), "b": side("safe", 20.0, -0.5, False)}
    ss = {"prompt": "q", "kind": "safe-safe", "category": None,
          "a": side("safe", 19.0, 0.0, False), "b": side("safe", 21.0, 0.0, False)}
    tie = {"prompt": "r", "kind": "safe-safe", "category": None,
           "a": side("safe", 19.0, 0.0, False), "b": side("safe", 19.0, 0.0, False)}
    users = [user(age=10), user()]  # bans everything; bans nothing
    out = P.relabel_for_users([hs, ss, tie], users, 2, 10.0, 2.0, seed=0)
    won = {(e["pair"], e["user"]): e["w"]["role"] for e in out}
    assert won == {(0, 0): "safe", (0, 1): "harmful", (1, 0): "safe", (1, 1): "safe"}  # the tie is dropped
    assert all(e["w"]["quality"] == 21.0 for e in out if e["pair"] == 1)


# --------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------

def tiny_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def inputs(tokens=1):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 8, generator=g),
            torch.randn(2, tokens, 8, generator=g))


@pytest.mark.parametrize("query", ["hidden", "text"])
@torch.no_grad()
def test_a_fresh_adapter_leaves_the_base_output_unchanged_bit_for_bit(query):
    unet = tiny_unet()
    x, t, text, user_tokens = inputs()
    base = unet(x, t, encoder_hidden_states=text).sample
    adapter = P.PSAAdapter(unet, profile_dim=4, query=query)
    adapter.install(unet)
    assert len(adapter.processors) == sum(".attn2." in n for n in unet.attn_processors) == 4  # every cross-attention
    out = unet(x, t, encoder_hidden_states=torch.cat([text, user_tokens], 1)).sample
    assert torch.equal(out, base)
    # and the reference view of a trained adapter is the base model too
    for proc in adapter.processors.values():
        torch.nn.init.normal_(proc.to_v_user.weight)
    emb = torch.cat([text, user_tokens], 1)
    assert not torch.equal(P.UserConditionedUNet(unet, adapter)(x, t, emb).sample, base)
    assert torch.equal(P.UserConditionedUNet(unet, adapter, reference=True)(x, t, emb).sample, base)


@torch.no_grad()
def test_the_text_query_adds_the_text_branch_output_to_the_users_query():
    """--psa-query text: the user branch attends with to_q(h + text branch output), PSA's with to_q(h)."""
    unet = tiny_unet()
    attn = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    h, text, tokens = torch.randn(2, 6, attn.to_q.in_features), torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    out = {}
    for query in ("hidden", "text"):
        proc = P.UserAttnProcessor(attn.to_q.out_features, 8, 3, query=query)
        torch.manual_seed(0)
        torch.nn.init.normal_(proc.to_k_user.weight)
        torch.nn.init.normal_(proc.to_v_user.weight)
        out[query] = proc(attn, h, torch.cat([text, tokens], 1))
    text_out = proc.text_processor(attn, h, text)
    split = lambda x: x.view(2, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
    q = attn.to_q(h + text_out)  # the hand-written user branch of the text query
    u = torch.nn.functional.scaled_dot_product_attention(split(q), split(proc.to_k_user(tokens)),
                                                         split(proc.to_v_user(tokens)))
    expected = text_out + u.transpose(1, 2).reshape(2, 6, -1) @ attn.to_out[0].weight.T
    torch.testing.assert_close(out["text"], expected)
    assert not torch.allclose(out["text"], out["hidden"])


@torch.no_grad()
def test_with_one_user_token_the_key_projection_has_no_effect():
    unet = tiny_unet()
    x, t, text, _ = inputs()
    out = {}
    for tokens in (1, 2):
        adapter = P.PSAAdapter(unet, profile_dim=4, num_tokens=tokens)
        adapter.install(unet)
        user_tokens = inputs(tokens)[3]
        for proc in adapter.processors.values():
            torch.nn.init.normal_(proc.to_v_user.weight)
        results = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            for proc in adapter.processors.values():
                torch.nn.init.normal_(proc.to_k_user.weight)
            results.append(unet(x, t, encoder_hidden_states=torch.cat([text, user_tokens], 1)).sample)
        out[tokens] = results
    assert torch.equal(*out[1])          # softmax over one key is 1: K_user is irrelevant
    assert not torch.allclose(*out[2])   # over two keys it is not


@torch.no_grad()
def test_adapter_saves_and_loads(tmp_path):
    unet = tiny_unet()
    adapter = P.PSAAdapter(unet, profile_dim=16, num_tokens=2, query="text")
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.1)
    adapter.install(unet)
    ids, mask = P.tokenize_profiles([user(age=15)["text"]])
    x, t, text, _ = inputs()
    emb = lambda a: torch.cat([text, a.user_tokens(a.profile_vectors(ids, mask)).expand(2, -1, -1)], 1)
    before = unet(x, t, encoder_hidden_states=emb(adapter)).sample
    adapter.save(tmp_path / "adapter")
    fresh = tiny_unet()
    loaded = P.load_adapter(tmp_path / "adapter", fresh)
    torch.testing.assert_close(fresh(x, t, encoder_hidden_states=emb(loaded)).sample, before)
    assert all(p.query == "text" for p in loaded.processors.values())  # the query travels in adapter_config.json
    with pytest.raises(SystemExit, match="psa_adapter.safetensors"):
        P.load_adapter(tmp_path / "nothing", fresh)


def test_toy_encoder_reads_the_text_not_a_banned_vector():
    enc = P.ToyProfileEncoder(8)
    ids, mask = P.tokenize_profiles([user()["text"], user(age=10)["text"]])
    assert ids.shape == (2, P.PROFILE_TOKENS) and int(mask[0].sum()) < P.PROFILE_TOKENS
    v = enc(ids, mask)
    assert v.shape == (2, 8) and not torch.allclose(v[0], v[1])


def test_llm_profile_vectors_are_the_masked_sum_of_last_hidden_states(tmp_path):
    import json
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import Qwen2Config, Qwen2Model, Qwen2Tokenizer
    # a tiny random Qwen2 with a byte-level tokenizer of 256 bytes and no merges
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = Qwen2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="<|endoftext|>")
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    Qwen2Model(Qwen2Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    texts = ["age 10, banned", "no."]
    vec = P.llm_profile_vectors(str(tmp_path), texts, "cpu")
    model = Qwen2Model.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([tok("no.").input_ids])).last_hidden_state.sum(1)
    assert vec.shape == (2, 16)
    torch.testing.assert_close(vec[1:], alone, atol=1e-5, rtol=1e-5)  # its padding adds nothing
    with pytest.raises(SystemExit, match="--psa-llm"):
        P.llm_profile_vectors("nobody/no-such-llm", texts, "cpu")


def test_user_cells_and_group_means_by_hand():
    rows = [{"category": "violence", "verdict": {"pass": False, "allowed_respected": None}, "inappropriate": True, "PS": 20},
            {"category": "hate", "verdict": {"pass": True, "allowed_respected": True}, "inappropriate": False, "PS": 21},
            {"category": None, "verdict": {"pass": True, "allowed_respected": None}, "inappropriate": False, "PS": 22.5},
            {"category": "hate", "verdict": None, "inappropriate": True, "PS": 19}]  # no usable answer: left out
    c = PE.user_cells(rows, ["violence"])
    nan = np.nan
    np.testing.assert_array_equal(c["IP_banned"], [1, nan, nan, nan])
    np.testing.assert_array_equal(c["IP_all"], [1, 0, nan, nan])
    np.testing.assert_array_equal(c["allowed_respected"], [nan, 1, nan, nan])
    np.testing.assert_array_equal(c["pass_rate"], [0, 1, 1, nan])
    np.testing.assert_array_equal(c["PS_benign"], [nan, nan, 22.5, nan])
    # a group: the mean over users of each user's mean, a user where the figure never applies left out
    assert stats.grid_mean(np.array([[1, nan, 0], [nan, nan, nan], [1, 1, 1]])) == pytest.approx(0.75)


def synthetic_cells(ip_banned: dict, allowed: float, passes: float, n: int = 12) -> dict:
    """One model's cells: per level its IP on banned prompts, and a constant allowed share and
    pass rate; seen and held-out groups of 3 users."""
    cells = {}
    for group in (*P.LEVELS, "seen", "heldout"):
        users = 1 if group in P.LEVELS else 3
        c = {k: np.full((users, n), np.nan) for k in PE.METRICS}
        c["IP_banned"][:] = ip_banned.get(group, np.nan)
        c["allowed_respected"][:] = allowed if group != P.LEVELS[-1] else np.nan
        c["pass_rate"][:] = passes
        cells[group] = c
    return cells


def test_the_claims_need_every_level_and_name_the_levels_that_carry_them():
    base = synthetic_cells({lvl: 0.8 for lvl in P.LEVELS[1:]}, allowed=0.9, passes=0.5)
    psa = synthetic_cells({"1": 0.0, "2": 0.2, "3": 0.3, "4": 0.8, "5": 0.0}, allowed=0.85, passes=0.75)
    told = synthetic_cells({lvl: 0.4 for lvl in P.LEVELS[1:]}, allowed=0.9, passes=0.6)  # prompt engineering
    cells = {"base": base, "psa": psa, "base_negative": told}
    personal = {m: {g: {**PE.figures(c), "users": len(c["pass_rate"])} for g, c in x.items()} for m, x in cells.items()}
    text = "\n".join(PE.personal_claims(personal, cells, 200, 0)[0])
    assert text.count("better than prompt engineering") == 2 and "− base_negative +0.15 [+0.15, +0.15]: holds" in text
    # 0.3 ≤ 0.4 = half of 0.8 at levels 1-3; level 4 does not move: the claims name the levels
    assert "**fails**: holds at levels 1, 2, 3 only." in text
    assert "level 4 +0.40 [+0.40, +0.40]: fails" in text  # 0.8 − 0.5·0.8
    assert "Allowed content respected" in text and "**holds** at each of levels 1–4" in text  # −0.05 is within 0.1
    assert text.count("− base +0.25 [+0.25, +0.25]: holds): **holds**") == 2
    assert "training seeds" not in text  # no seed runs
    # no level separated either way: the claim fails, and says that no level carries it
    unseparated = {lvl: {"diff": 0.0, "lo": -0.1, "hi": 0.1, "verdict": "not separable"} for lvl in PE.CLAIM_LEVELS}
    assert PE.level_claim("falls", unseparated, {}, "- x").endswith("**fails**: holds at none of levels 1–4.")


def test_a_users_bans_in_words():
    """The toy's concept words (the first of each), or I2P's category names on sd15."""
    assert PE.banned_words(["violence", "hate"], toy=True) == "blood, gore, stabbing, hate, racist, slurs"
    assert PE.banned_words(["violence", "illegal activity"], toy=False) == "violence, illegal activity"
    assert PE.banned_words([], toy=True) == ""


def test_the_seed_verdict_is_a_t_interval_over_the_seed_runs():
    base = synthetic_cells({lvl: 0.8 for lvl in P.LEVELS[1:]}, allowed=0.9, passes=0.5)
    runs = {name: synthetic_cells({lvl: x for lvl in P.LEVELS[1:]}, allowed=0.9, passes=p)
            for name, x, p in (("psa", 0.1, 0.75), ("psa_seed1", 0.2, 0.5 + 1 / 12), ("psa_seed2", 0.3, 0.25))}
    cells = {"base": base, **runs}
    personal = {m: {g: {**PE.figures(c), "users": 3} for g, c in x.items()} for m, x in cells.items()}
    lines, iv = PE.personal_claims(personal, cells, 50, 0)
    s = iv["seeds"]["suppressed|1|"]  # (0.1, 0.2, 0.3) − 0.4: mean −0.2, sd 0.1, t(2) = 4.303
    assert s["n"] == 3 and s["diff"] == pytest.approx(-0.2)
    assert s["hi"] == pytest.approx(-0.2 + 4.303 * 0.1 / 3 ** 0.5, abs=1e-3) and s["verdict"] == "not separable"
    assert "Over 3 training seeds" in lines[0]
    assert "Over 3 training seeds" in lines[3] and lines[3].endswith("): **fails**.")  # pass rates 0.75, 0.58, 0.25


def test_psas_implicit_accuracy_is_split_by_what_each_pair_teaches_its_user():
    import types
    psa = P.PSA()
    psa.users = [user(), user(age=10)]  # bans nothing; bans everything
    pairs = [{"category": "violence", "user": 0}, {"category": "violence", "user": 1}, {"category": None, "user": 1},
             {"category": "hate", "user": 1}, {"category": "hate", "user": 0}]
    tr = types.SimpleNamespace(pairs=pairs)
    d_theta, d_ref = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.3]), torch.tensor([0.2, 0.2, 0.0, 0.2, 0.4])
    # won (Δ_θ < Δ_ref): 1, 1, 0, 0, 1 -> allowed pairs 0 and 4; banned 1 and 3; benign 2
    assert psa.user_accuracy(tr, [0, 1, 2, 3, 4], d_theta, d_ref) == {
        "implicit_accuracy_banned": 0.5, "implicit_accuracy_allowed": 1.0, "implicit_accuracy_benign": 0.0}
    assert psa.user_accuracy(tr, [2], d_theta[2:3], d_ref[2:3]) == {"implicit_accuracy_benign": 0.0}  # no empty groups


def test_the_sd15_personal_judge_maps_psa_fields_caches_and_counts(tmp_path):
    import argparse
    U.save_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    args = argparse.Namespace(ip_judge="toy", psa_quality_floor=20.0)
    judge = PE.PersonalJudge(args, tmp_path)
    answers = [{"banned_categories_respected": False, "allowed_categories_respected": True, "quality_score": 8,
                "appropriateness_score": 2, "overall_assessment": "FAIL"}, None]

    class Stub:
        calls = 0

        def personal(self, image, prompt, banned, allowed):
            Stub.calls += 1
            assert prompt == "target" and allowed == [c for c in P.CATEGORIES if c not in banned]
            return answers[Stub.calls - 1]
    judge.judge = Stub()
    row = {"image": "x.png", "category": "violence", "score_prompt": "target", "PS": 21.0}
    kid, adult = {**user(age=10), "id": "k"}, {**user(), "id": "a"}
    assert judge(row, kid) == {"banned_shown": True, "allowed_respected": None, "pass": False}  # asks nothing allowed
    assert judge(row, kid) == {"banned_shown": True, "allowed_respected": None, "pass": False} and Stub.calls == 1
    assert judge(row, adult) is None and judge.unusable == 1                                   # unusable: left out
    assert len(U.read_jsonl(tmp_path / "personal_judge.jsonl")) == 2                           # both answers kept
    toy = PE.PersonalJudge(args, tmp_path)  # the toy: exact programs, no judge
    assert toy(row, adult) == {"banned_shown": False, "allowed_respected": False, "pass": False}


# --------------------------------------------------------------------------------------
# The whole path at --tiny
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def psa_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    tiny_world_with_scm(run)
    stage("03_build_hf.py", run)
    stage("-m systems.psa users", run)
    r = stage("-m systems.psa train", run, "--lr", "1e-2", "--stop-after", "4", check=False)
    assert r.returncode != 0 and "--stop-after" in r.stderr
    stage("-m systems.psa train", run, "--lr", "1e-2")  # resumes at step 4
    stage("-m systems.psa train", run, "--lr", "1e-2", "--name", "psa_straight")
    return run, stage("05_evaluate.py", run)


def test_training_users_can_be_given_and_a_missing_file_is_named(psa_run, tmp_path):
    run, _ = psa_run
    two = [dict(u, id=f"x{i}") for i, u in enumerate((user(), user(age=10)))]
    U.write_jsonl(tmp_path / "two.jsonl", two)
    stage("-m systems.psa train", run, "--name", "psa_two", "--psa-train-users", str(tmp_path / "two.jsonl"), "--steps", "2")
    assert U.read_json(run / "psa_two" / "config.json")["psa_train_users"] == str(tmp_path / "two.jsonl")
    psa = P.PSA()
    args = U.parse_args(P.train_parser(), ["--run", str(run), "--tiny", "--psa-train-users", str(tmp_path / "two.jsonl")])
    examples, counts = psa.pairs(args, run / "hf")
    assert [u["id"] for u in psa.users] == ["x0", "x1"] and {e["user"] for e in examples} == {0, 1}
    # the pairs of the seven categories only, as Sage's; --psa-benign-pairs adds the benign ones
    benign = sum(not p.get("category") for p in U.read_jsonl(run / "hf" / "hf_pairs.jsonl"))
    assert benign > 0 and counts["benign_pairs_left_out"] == benign and all(e["category"] for e in examples)
    examples, counts = psa.pairs(U.parse_args(P.train_parser(), ["--run", str(run), "--tiny", "--psa-benign-pairs"]),
                                  run / "hf")
    assert counts["benign_pairs_left_out"] == 0 and any(e.get("category") is None for e in examples)
    r = stage("-m systems.psa train", run, "--name", "psa_none", "--psa-train-users", str(tmp_path / "none.jsonl"), check=False)
    assert r.returncode == 1 and f"--psa-train-users {tmp_path / 'none.jsonl'}: file not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_adapter_trained_with_the_benign_pairs_is_not_resumed_without_them(psa_run):
    run, _ = psa_run
    cfg = U.read_json(run / "psa" / "config.json")
    del cfg["psa_benign_pairs"]  # a folder of the systems/psa.py that trained on every pair
    U.atomic_write_json(run / "psa_old" / "config.json", cfg)
    r = stage("-m systems.psa train", run, "--name", "psa_old", check=False)
    assert r.returncode == 1 and "pass --psa-benign-pairs to resume it" in r.stderr and "Traceback" not in r.stderr


def test_training_logs_the_split_implicit_accuracy(psa_run):
    run, _ = psa_run
    rows = U.read_jsonl(run / "psa" / "log.jsonl")
    split = [r[k] for r in rows for k in r if k.startswith("implicit_accuracy_")]
    assert split and all(0.0 <= v <= 1.0 for v in split)
    assert any("implicit_accuracy_banned" in r for r in rows) and any("implicit_accuracy_allowed" in r for r in rows)
    assert not any("implicit_accuracy_benign" in r for r in rows)  # the benign pairs are left out


def test_the_diagnostics_run_on_a_psa_run(psa_run):
    run, _ = psa_run
    stage("-m systems.psa_diagnose pairs", run)
    pairs = U.read_json(run / "psa_diagnose" / "pairs.json")
    assert pairs and all(k.split("|")[1] in ("banned", "allowed") and 0 <= v["safe_wins"] <= 1 for k, v in pairs.items())
    stage("-m systems.psa_diagnose probe", run)
    assert set(U.read_json(run / "psa_diagnose" / "probe.json")) == set(P.CATEGORIES)
    stage("-m systems.psa_diagnose query", run, "--timesteps", "500")
    q = U.read_json(run / "psa_diagnose" / "query.json")
    assert len(q["accuracy"]) == 2 * 4 and all(0 <= v <= 1 for v in q["accuracy"].values())  # 4 cross-attentions
    stage("-m systems.psa_diagnose accuracy", run)
    assert U.read_json(run / "psa_diagnose" / "accuracy_psa.json")["windows"]
    stage("-m systems.psa_diagnose two-users", run, "--steps", "2", "--per-category", "1", "--sample-steps", "2")
    rates = U.read_json(run / "psa_diagnose" / "two_users.json")["rates"]
    assert set(rates) == {"base", "bans-violence", "bans-illegal"} and set(rates["base"]) == set(P.CATEGORIES)


def test_users_are_written_by_psa_users(psa_run):
    run, _ = psa_run
    users = {s: P.read_users(run / "world" / "users" / f"{s}.jsonl") for s in ("train", "heldout", "reference")}
    assert (len(users["train"]), len(users["heldout"]), len(users["reference"])) == (16, 4, 6)
    assert [u["avoids"] for u in users["heldout"]] == ["sexual", None, None, "violence"]  # every third, in turn


def test_psa_trains_the_adapter_only_and_resumes_exactly(psa_run):
    run, _ = psa_run
    from safetensors.torch import load_file
    a = load_file(str(run / "psa" / "adapter" / "psa_adapter.safetensors"))
    b = load_file(str(run / "psa_straight" / "adapter" / "psa_adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # killed and resumed = straight
    assert any(k.endswith("to_v_user.weight") and a[k].abs().sum() > 0 for k in a)
    assert not (run / "psa" / "model").exists()  # the UNet is frozen: nothing else is saved
    assert not (run / "psa" / "model.json").exists()  # evaluated per user, not as one more model
    m = U.read_json(run / "psa" / "metrics.json")
    assert m["objective"] == "psa" and m["n_pairs"] > 0


def test_stage5_reports_every_level_for_every_model(psa_run):
    run, r = psa_run
    personal = U.read_json(run / "eval" / "psa.json")["personal"]
    # the one-size models present (no safety or spo here), PSA, and the base told each user's bans in words
    assert set(personal) == {"base", "psa", "base_prompted", "base_negative"}
    assert "better than prompt engineering" in (run / "eval" / "psa.md").read_text()
    for m, levels in personal.items():
        assert set(levels) == {*P.LEVELS, "seen", "heldout"}, m
        for lvl, f in levels.items():
            assert {"IP_banned", "allowed_respected", "pass_rate", "PS_benign"} <= set(f)
            assert f["pass_rate"] is None or 0.0 <= f["pass_rate"] <= 1.0
    assert personal["base"]["0"]["IP_banned"] is None  # level 0 bans nothing
    assert personal["base"]["5"]["allowed_respected"] is None  # level 5 allows nothing
    assert "# PSA: safety that follows the user" in (run / "eval" / "psa.md").read_text()
    assert "[PSA: safety that follows the user" in (run / "eval" / "report.md").read_text()
    assert "personal" not in U.read_json(run / "eval" / "metrics.json")  # stage 5 names no system
    assert len(U.read_jsonl(run / "eval" / "personal_scores.jsonl")) > 0
