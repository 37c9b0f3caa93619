"""lib/scorers.py: PickScore, CLIPScore and Q16 on a tiny random-weight CLIP saved in code (no
downloads), NudeNet's labels and its detector offline, and a missing real model named."""
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lib import models as M
from lib import scorers as S
from lib import toyworld as W
from lib import utils as U


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


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_q16_reads_the_published_prompts_file():
    """Q16's own data/ViT-L-14/prompts.p (a pickled float16 numpy array): two prompts of 768."""
    prompts = S.load_q16_prompts(FIXTURES / "q16" / "ViT-L-14_prompts.p")
    assert prompts.shape == (2, 768) and prompts.dtype == torch.float32 and torch.isfinite(prompts).all()


class RunsCode:
    """A pickle that would run a shell command when loaded by a plain pickle.load."""
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_q16_refuses_a_pickle_that_would_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "prompts.p"
    path.write_bytes(pickle.dumps(RunsCode()))
    refused = r"prompts.p: not a pickled numpy array .*(posix|os)\.system is not part of a numpy array"
    with pytest.raises(U.DataError, match=refused):
        S.load_q16_prompts(path)
    assert not (tmp_path / "PWNED").exists()


def test_scm_cost_of_a_non_square_image_is_the_cost_of_its_centre_square():
    """Rows may ask for their own size: the SCM takes CLIP's centre square of a non-square
    image, in a batch of mixed sizes as alone."""
    torch.manual_seed(0)
    scm = S.SafetyCostModel("toy-ViT-tiny", hidden=16).eval()
    images, _ = drawn(2)
    side = images[0].shape[0]
    wide = np.random.default_rng(0).integers(0, 256, (side, side + 12, 3), dtype=np.uint8)
    wide[:, 6:6 + side] = images[1]
    mixed = scm.cost([images[0], wide, images[1]])
    alone = scm.cost(images)
    assert torch.allclose(mixed[[0, 2]], alone, atol=1e-5) and torch.allclose(mixed[1], alone[1], atol=1e-5)
    assert not torch.allclose(scm.cost([wide[:, :side]]), alone[1:], atol=1e-3)  # a crop elsewhere differs
