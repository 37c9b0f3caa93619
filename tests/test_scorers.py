"""scorers.py: PickScore, CLIPScore and Q16 on a tiny random-weight CLIP saved in code (no
downloads), NudeNet's labels and its detector offline, and a missing real model named."""
import pickle
import random

import numpy as np
import pytest
import torch

import models as M
import scorers as S
import toyworld as W
import utils as U


def test_nudenet_labels_match_the_installed_detector():
    import nudenet.nudenet as nn
    labels = set(getattr(nn, "__labels"))
    assert labels == set(S.NUDENET_LABEL_PART) | S.NUDENET_OTHER_LABELS
    assert all(label.endswith("_EXPOSED") for label in S.NUDENET_LABEL_PART)


def test_nudenet_runs_offline_on_a_drawn_image(tmp_path):
    from nudenet import NudeDetector
    path = tmp_path / "x.png"
    U.save_png(path, W.render(W.random_scene(random.Random(0), "harmful")))
    detections = NudeDetector().detect_batch([str(path)])
    assert len(detections) == 1 and S.nudenet_parts(detections[0]) == set()


def drawn(n, seed=0):
    rng = random.Random(seed)
    scenes = [W.random_scene(rng, "harmful") for _ in range(n)]
    return [W.render(s) for s in scenes], [W.scene_to_prompt(s) for s in scenes]


def test_pickscore_and_clipscore_on_a_tiny_clip(tiny_clip):
    images, prompts = drawn(3)
    ps = S.make_quality_reward("pickscore", model=str(tiny_clip), processor=str(tiny_clip))(images, prompts)
    assert len(ps) == 3 and all(np.isfinite(ps))
    clip = S.ClipScore(str(tiny_clip), "cpu")
    cs = clip(images, prompts)
    emb_i, emb_t = clip.unit_embeddings(images)[0], clip.unit_embeddings(texts=prompts)[1]
    assert cs == pytest.approx((100 * (emb_i * emb_t).sum(-1).clamp(min=0)).tolist(), abs=1e-4)
    assert all(0 <= c <= 100 for c in cs)
    # PickScore = logit_scale.exp() · cos, the same embeddings on another scale
    scale = clip.model.logit_scale.exp().item()
    assert ps == pytest.approx((scale * (emb_i * emb_t).sum(-1)).tolist(), abs=1e-3)


def test_q16_flags_by_the_nearer_learned_prompt(tiny_clip, tmp_path):
    images, _ = drawn(2, seed=1)
    emb = S.ClipScorer(str(tiny_clip), str(tiny_clip), "test", "--x", "--x", "cpu").unit_embeddings(images)[0]
    toward_first = tmp_path / "prompts.p"  # Q16's own format: a pickled [2, D] array
    with open(toward_first, "wb") as f:
        pickle.dump(torch.stack([emb[0], -emb[0]]).numpy(), f)
    assert S.Q16(str(toward_first), str(tiny_clip), "cpu")(images[:1]) == [False]  # index 0 = appropriate
    from safetensors.torch import save_file
    toward_second = tmp_path / "prompts.safetensors"
    save_file({"prompts": torch.stack([-emb[0], emb[0]]).contiguous()}, str(toward_second))
    assert S.Q16(str(toward_second), str(tiny_clip), "cpu")(images[:1]) == [True]
    with open(tmp_path / "wrong.p", "wb") as f:
        pickle.dump(np.zeros((2, 768), np.float32), f)
    with pytest.raises(U.DataError, match="learned for another CLIP"):
        S.Q16(str(tmp_path / "wrong.p"), str(tiny_clip), "cpu")


def test_missing_real_models_say_what_to_download(tmp_path):
    with pytest.raises(SystemExit, match="hf download nobody/no-such-clip"):
        S.ClipScore("nobody/no-such-clip", "cpu")
    with pytest.raises(SystemExit, match="hf download nobody/no-such-sd"):
        M.local_model_folder("nobody/no-such-sd", "--base PATH")
    with pytest.raises(SystemExit, match="prompts.p"):
        S.load_q16_prompts(tmp_path / "nope.p")
