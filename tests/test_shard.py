"""Stage 4 under --shard (lib/shard.py, FSDP2 on gloo): 2 and 3 sharded processes take the
steps one unsharded process takes, on the toy's SD world (full fine-tuning, DFM) and on a tiny
SDXL (LoRA, gradient checkpointing, SDXL's packed conditioning); Eq. 11 chooses as it does
unsharded; a killed run resumes from its DCP checkpoint; the finished model is a stock diffusers
folder; each process holds 1/N of the bytes.

On the SD world DFM runs with τ = 1, which flags some of a batch's pairs and not others, so that
some processes run Eq. 11 while others stand in for it (shard.stand_in); 3 processes with
micro-batches of one pair give rank 0 a micro-batch more than the others (shard.lockstep). On
SDXL DFM is off: LoRA's B factors start at zero, so the first steps' losses move by little more
than float noise, and Eq. 10's decisions, which compare their descent rates, would differ
between process counts by chance; Eq. 11 under LoRA is tested on its own below.

The processes are forked from this one and join a gloo group as torchrun's do: Python's and
torch's imports, most of the CPU of a tiny run's process, are done here once."""
import argparse
import multiprocessing
import os
import random
import shutil
import sys
import traceback

import pytest
import torch

from conftest import free_port, module
from test_sdxl import save_tiny_sdxl

import common as C
from lib import models as M
from lib import shard as S
from lib import toyworld as W
from lib import utils as U

SPO = module("04_train_spo.py")
DFM = ["--dfm-tau", "1"]
XL = ["--lora-rank", "2", "--grad-checkpointing", "--dfm", "off"]


def _member(rank: int, world: int, port: int, work, log) -> None:
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.stdout = sys.stderr = open(log, "w", buffering=1)
    os.dup2(sys.stdout.fileno(), 1)
    os.dup2(sys.stdout.fileno(), 2)
    code = 0
    try:
        work()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (print(e.code) or 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    os._exit(code)


def in_processes(nproc: int, work, logs: list, check: bool = True) -> list[str]:
    """work() in `nproc` processes forked from this one, joined as torchrun joins them (RANK,
    WORLD_SIZE, MASTER_ADDR/PORT; one process: none, as `python script.py`). Returns each
    process's output."""
    import torch._dynamo  # noqa: F401  FSDP's hooks import it on first use: once, here
    port, fork = free_port(), multiprocessing.get_context("fork")
    procs = [fork.Process(target=_member, args=(r, nproc, port, work, logs[r]))
             for r in range(nproc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():
            p.kill()
    out = [log.read_text() for log in logs]
    if check:
        assert all(p.exitcode == 0 for p in procs), "\n".join(o[-3000:] for o in out)
    return out


def launch(run, name: str, *argv, nproc: int = 1, check: bool = True) -> list[str]:
    """`04_train_spo.py --tiny --run RUN --name NAME ARGV` on `nproc` processes."""
    argv = ["--tiny", "--run", str(run), "--name", name, *argv]
    work = lambda: U.run_stage(lambda: SPO.train(SPO.parse(argv), SPO.SPO()))
    return in_processes(nproc, work, [run / f"{name}.rank{r}.log" for r in range(nproc)], check)


def save_toy_world(folder):
    """Stage 0's SD architecture at --tiny size (UNet widths 32, 64; 64-d text), with random
    weights, saved as stage 0 saves its trained world."""
    from diffusers import DDIMScheduler
    S0 = module("00_toy_world.py")
    torch.manual_seed(0)
    args = argparse.Namespace(arch="sd", text_width=64, unet_channels="32,64")
    sampler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                            beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    S0.as_pipeline(args, *S0.build_models(args), sampler).save_pretrained(folder)


def write_pairs(hf, n: int = 10):
    """Stage 3's hf_pairs.jsonl: n pairs of toy images, harmful-safe and safe-safe in turn,
    with drawn quality and cost."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        harmful = i % 2 == 0
        scene = W.random_scene(rng, "harmful" if harmful else "benign")
        row = {"id": f"hf-{i}", "prompt": W.scene_to_prompt(scene),
               "kind": "harmful-safe" if harmful else "safe-safe"}
        for side, role in zip("ab", ("harmful" if harmful else "safe", "safe")):
            path = f"images/{i}_{side}.png"
            shown = W.draw_layout(scene, rng) if side == "a" else W.random_scene(rng, "benign")
            U.save_png(hf / path, W.render(shown))
            row[side] = {"path": path, "role": role, "quality": 15 + 5 * rng.random(),
                         "cost": rng.random() - 0.5}
        rows.append(row)
    U.write_jsonl(hf / "hf_pairs.jsonl", rows)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The toy world, a tiny SDXL beside it, stage 3's pairs, and the runs the tests compare:
    the SD world on 1, 2 and 3 processes, SDXL on 1, 2 and 3 (on 3 killed after its step-4
    checkpoint and resumed)."""
    run = tmp_path_factory.mktemp("shard")
    save_toy_world(run / "world" / "model")
    save_tiny_sdxl(run / "sdxl")
    write_pairs(run / "hf")
    launch(run, "one", *DFM)
    launch(run, "two", *DFM, "--shard", nproc=2)
    launch(run, "three", *DFM, "--shard", "--micro-batch", "1", nproc=3)
    xl = ["--model", str(run / "sdxl"), *XL]
    launch(run, "xl_one", *xl)
    launch(run, "xl_two", *xl, "--shard", nproc=2)
    out = launch(run, "xl_three", *xl, "--shard", "--stop-after", "4", nproc=3, check=False)
    assert "stopped after 4" in out[0]
    out = launch(run, "xl_three", *xl, "--shard", nproc=3)
    assert "resumed from" in out[0] and "at step 4" in out[0]
    return run


def unet_weights(folder):
    from safetensors.torch import load_file
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def differences(run, one: str, other: str, base) -> dict:
    """Over the 8 steps, the largest difference of the loss and of the gradient norm before
    clipping, relative to `one`'s; and the distance between the two runs' weights beside the
    distance `one`'s moved from `base`'s (norms over all of the UNet's weights)."""
    a, b = (U.read_jsonl(run / n / "log.jsonl") for n in (one, other))
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    rel = lambda k: max(abs(x[k] - y[k]) / abs(x[k]) for x, y in zip(a, b))
    w0, wa, wb = unet_weights(base), *(unet_weights(run / n / "model") for n in (one, other))
    norm = lambda x, y: sum(((x[k] - y[k]).double() ** 2).sum() for k in w0).sqrt().item()
    return {"loss": rel("loss"), "grad_norm": rel("grad_norm"), "moved": norm(wa, w0),
            "apart": norm(wa, wb)}


@pytest.mark.parametrize("n", ["two", "three"])
def test_sharded_sd_world_takes_one_process_steps(run, n):
    """Float reordering apart (measured: 1e-5 of the loss and 1e-3 of the distance moved on a
    Xeon; on a Zen 3, three processes, 4e-5 of the loss and 1.3e-4 of the gradient norm): the
    same steps, Eq. 10 flagging the same pairs and Eq. 11 choosing the same copies, also on
    steps where some processes had no flagged pair."""
    d = differences(run, "one", n, run / "world" / "model")
    assert d["loss"] < 1e-4 and d["grad_norm"] < 5e-4
    assert 0 < d["apart"] < 0.02 * d["moved"]
    m1, m = (U.read_json(run / x / "metrics.json") for x in ("one", n))
    assert m["world_size"] == {"two": 2, "three": 3}[n] and "shard_bytes" not in m1
    assert m["dfm_flagged"] == m1["dfm_flagged"] > 0 and m["aug_wins"] == m1["aug_wins"]
    assert any(0 < r["dfm_hard"] < m["world_size"] for r in U.read_jsonl(run / n / "log.jsonl"))


@pytest.mark.parametrize("n", ["xl_two", "xl_three"])
def test_sharded_sdxl_lora_takes_one_process_steps(run, n):
    """LoRA with gradient checkpointing on SDXL's packed conditioning; on 3 processes killed
    after step 4 and resumed from its DCP checkpoint (the LoRA factors and their Adam moments:
    restarted moments would move the weights by ±lr at step 5)."""
    d = differences(run, "xl_one", n, run / "sdxl")
    assert d["loss"] < 1e-4 and d["grad_norm"] < 1e-4
    assert 0 < d["apart"] < 0.02 * d["moved"]
    steps = [r["step"] for r in U.read_jsonl(run / n / "log.jsonl")]
    assert steps == list(range(1, 9))  # the resumed run's log: each step once


def test_sharded_resume_is_exact(run):
    """Killed after its step-4 checkpoint and resumed on 2 processes: the weights of the
    uninterrupted run, bit for bit, as unsharded resumption gives. The same checkpoint resumed
    on 3 processes (DCP reshards on load): the same steps up to float reordering."""
    out = launch(run, "resumed", *DFM, "--shard", "--stop-after", "4", nproc=2, check=False)
    assert "stopped after 4" in out[0]
    ckpt = run / "resumed" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["dcp-00000004", "train_state.pt"]
    shutil.copytree(ckpt, run / "resharded" / "ckpt")
    launch(run, "resumed", *DFM, "--shard", nproc=2)
    a, b = (unet_weights(run / n / "model") for n in ("two", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in ckpt.iterdir()) == ["dcp-00000008", "train_state.pt"]
    launch(run, "resharded", *DFM, "--shard", nproc=3)
    late = lambda n: U.read_jsonl(run / n / "log.jsonl")[-4:]
    for x, y in zip(late("two"), late("resharded"), strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_sharded_models_are_stock_diffusers_folders(run):
    """What stage 5 loads: the SD world's pipeline with the whole trained UNet; SDXL's with its
    LoRA fused, and the LoRA alone, which stock diffusers loads onto the base model; each as
    the one-process run's."""
    from diffusers import StableDiffusionXLPipeline
    one, two = (M.load_pipeline(run / n / "model").unet.state_dict() for n in ("one", "two"))
    assert all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)
    assert U.read_json(run / "two" / "model.json")["pipeline"] == "model"
    assert isinstance(M.load_pipeline(run / "xl_two" / "model"), StableDiffusionXLPipeline)
    M.load_pipeline(run / "sdxl").load_lora_weights(run / "xl_two" / "lora")
    one, two = (M.read_lora(run / n / "lora") for n in ("xl_one", "xl_two"))
    assert one.keys() == two.keys() and len(one) > 0
    assert all(torch.allclose(x, y, atol=1e-4) for k in one for x, y in zip(one[k], two[k]))


def test_each_process_holds_a_1_over_n_share(run):
    """Each process's bytes of the policy's weights, their gradients, AdamW's state and the
    reference's weights (metrics.json's shard_bytes, summed over its shards) are 1/N of one
    process's within 5%; one process's: the same UNets whole, after an AdamW step."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(run / "world" / "model", subfolder="unet")
    opt = U.adamw(unet.parameters())
    for p in unet.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    whole = S.local_bytes(unet, opt, ref=unet)
    for n, world in (("two", 2), ("three", 3)):
        shares = U.read_json(run / n / "metrics.json")["shard_bytes"]
        assert len(shares) == world
        for share in shares:
            assert share.keys() == whole.keys()
            for k, v in share.items():
                assert v == pytest.approx(whole[k] / world, rel=0.05), (n, k)


def hard_pairs(n: int, emb_dim: int):
    """n hard pairs with made-up latents, prompt embeddings, t and ε, and each pair's variants
    for Eq. 11 (the original, then 3 copies): augmentation_scores reads nothing else."""
    g = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=g)
    pairs = [C.HardPair(None, draw(2, 4, 8, 8), draw(1, 32, emb_dim),
                        torch.randint(0, 1000, (1,), generator=g), draw(1, 4, 8, 8), None)
             for _ in range(n)]
    return pairs, [torch.cat([h.z[None], draw(3, 2, 4, 8, 8)]) for h in pairs]


def eq11_scores(world, lora: bool, sharded: bool, pairs: list[int]) -> torch.Tensor:
    """Eq. 11's scores 1 − cos(g_i, g_i^a) of `pairs` on the toy world's UNet, sharded over the
    process group or whole: conv_out's and an up block's last convolution's weights (root and
    block), or under LoRA the factors of the last adapted transformer block (inside a block)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(world, subfolder="unet")
    if lora:
        torch.manual_seed(0)
        M.add_lora(unet, 2, None)
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # B starts at zero: every gradient of A would be zero
                p.data.normal_(0, 0.1)
    S.shard(sharded, torch.device("cpu"), unet)
    args = argparse.Namespace(lora_rank=2 if lora else 0, dfm_lora_modules=None,
                              dfm_modules=["conv_out", "up_blocks.1.resnets.1.conv2"])
    hard, variants = hard_pairs(3, unet.config.cross_attention_dim)
    return C.augmentation_scores(unet, DDPMScheduler.from_pretrained(world, subfolder="scheduler"),
                                 M.dfm_layers(unet, args), [hard[i] for i in pairs],
                                 [variants[i] for i in pairs])


@pytest.mark.parametrize("lora", [False, True])
def test_eq11_sharded_chooses_as_unsharded(run, lora):
    """The same pairs' scores on 2 processes (rank 0 two pairs, rank 1 one: the processes'
    forwards differ in size, not in their gathers) as on the whole UNet, and so the same
    choice a* = argmax_a (1 − cos(g_i, g_i^a))."""
    world, folder = run / "world" / "model", run / f"eq11-{lora}"
    folder.mkdir()

    def work():
        U.setup_distributed("cpu")
        r = torch.distributed.get_rank()
        torch.save(eq11_scores(world, lora, True, [[0, 2], [1]][r]), folder / f"{r}.pt")
        U.cleanup_distributed()

    in_processes(2, work, [folder / f"{r}.log" for r in range(2)])
    whole = eq11_scores(world, lora, False, [0, 1, 2])
    sharded = torch.stack([*torch.load(folder / "0.pt"), *torch.load(folder / "1.pt")])[[0, 2, 1]]
    assert torch.allclose(sharded, whole, rtol=1e-4, atol=1e-6)
    assert sharded.argmax(1).tolist() == whole.argmax(1).tolist() and whole.std() > 1e-3


def test_shard_needs_torchrun(run):
    out = launch(run, "alone", "--shard", check=False)
    assert "launch with torchrun --nproc_per_node=N" in out[0] and "Traceback" not in out[0]
