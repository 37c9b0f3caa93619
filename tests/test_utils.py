"""Plumbing in common.py: presets and flags, files, JSONL errors, distributed set-up."""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port
from lib import models as M
from lib import utils as U

ROOT = Path(__file__).resolve().parents[1]


def test_import_leaves_heavy_libraries_alone():
    """`import common` stays light: diffusers, transformers and open_clip load only inside
    the functions that need them."""
    code = "import sys, common; print(sorted(m for m in ('diffusers', 'transformers', 'open_clip') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_sample_dtype_explicit_and_auto(monkeypatch):
    assert [M.sample_dtype(n, "cpu") for n in ("float32", "bfloat16", "float16")] == [
        torch.float32, torch.bfloat16, torch.float16]
    # "auto" on a CPU: bf16 only with native bf16 instructions, else fp32 (emulated bf16 is slower)
    monkeypatch.setattr(M, "_cpu_flags", lambda: "flags\t: fpu avx2 avx512f avx512_bf16 avx512_vnni")
    assert M.sample_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(M, "_cpu_flags", lambda: "flags\t: fpu avx2 amx_bf16 amx_tile")
    assert M.sample_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(M, "_cpu_flags", lambda: "flags\t: fpu avx2 avx512f avx512bw")
    assert M.sample_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(M, "_cpu_flags", lambda: "")  # not Linux
    assert M.sample_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        M.sample_dtype("fp8", "cpu")


def test_parse_args_preset_defaults_tiny_and_explicit_flags(monkeypatch):
    monkeypatch.setitem(U.PRESETS, "toy", {"demo": {"steps": 100, "lr": 0.1}})
    monkeypatch.setitem(U.PRESETS, "sd15", {"demo": {"steps": 5000, "lr": 1e-5}})
    monkeypatch.setitem(U.TINY, "demo", {"steps": 3})
    monkeypatch.setitem(U.STAGES, "demo", ("demo.py", "demo"))

    def parser():
        p = U.stage_parser("demo", "demo stage")
        p.add_argument("--steps", type=int)
        p.add_argument("--lr", type=float)
        return p

    a = U.parse_args(parser(), [])
    assert (a.preset, a.steps, a.lr, a.run) == ("toy", 100, 0.1, "runs/toy")
    a = U.parse_args(parser(), ["--preset", "sd15"])
    assert (a.steps, a.lr) == (5000, 1e-5)
    a = U.parse_args(parser(), ["--tiny"])
    assert (a.steps, a.lr) == (3, 0.1)
    a = U.parse_args(parser(), ["--tiny", "--steps", "7"])
    assert a.steps == 7  # an explicit flag beats preset and tiny


def test_parse_args_rejects_preset_key_without_flag(monkeypatch):
    monkeypatch.setitem(U.PRESETS, "toy", {"demo": {"nonexistent": 1}})
    monkeypatch.setitem(U.STAGES, "demo", ("demo.py", "demo"))
    with pytest.raises(ValueError, match="nonexistent"):
        U.parse_args(U.stage_parser("demo", ""), [])


def test_save_config_and_stage_dir(tmp_path, monkeypatch):
    # a test file that imports stage 2 in this process has added its preset entries, which
    # this parser's flags do not know
    monkeypatch.setitem(U.PRESETS["toy"], "scm", {})
    p = U.stage_parser("scm", "")
    a = U.parse_args(p, ["--run", str(tmp_path), "--seed", "3"])
    out = U.stage_dir(a.run, "scm")
    assert out == tmp_path / "scm"
    U.save_config(a, out, extra_setting=1)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == 3 and cfg["extra_setting"] == 1 and cfg["run"] == str(tmp_path)
    assert "_stage" not in cfg


def test_require_inputs_names_the_stage_to_run(tmp_path):
    with pytest.raises(SystemExit, match="02_train_scm.py"):
        U.require_inputs([tmp_path / "scm" / "scm.safetensors"], "scm")
    U.require_inputs([tmp_path], "scm")  # present: no error


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    f = tmp_path / "sub" / "x.json"
    U.atomic_write_json(f, {"a": 1})
    U.atomic_write_json(f, {"a": 2})
    assert json.loads(f.read_text()) == {"a": 2}
    assert [p.name for p in f.parent.iterdir()] == ["x.json"]


def test_atomic_write_failure_keeps_old_content(tmp_path):
    f = tmp_path / "x.txt"
    U.atomic_write_text(f, "old")

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        U.atomic_write_json(f, {"bad": Boom()})  # json fails before anything is written
    with pytest.raises(TypeError):
        U.atomic_write_bytes(f, "not bytes")  # write fails mid-way: temp file removed
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_jsonl_roundtrip_and_line_numbered_errors(tmp_path):
    f = tmp_path / "rows.jsonl"
    U.write_jsonl(f, [{"i": 0}, {"i": 1}])
    assert U.read_jsonl(f) == [{"i": 0}, {"i": 1}]
    f.write_text('{"i": 0}\n\n{"i": 1\n')
    with pytest.raises(U.DataError, match=r"rows.jsonl:3: malformed JSON"):
        U.read_jsonl(f)
    f.write_text('{"i": 0}\n[1, 2]\n')
    with pytest.raises(U.DataError, match=r"rows.jsonl:2: expected a JSON object"):
        U.read_jsonl(f)
    with pytest.raises(U.DataError, match="not found"):
        U.read_jsonl(tmp_path / "missing.jsonl")
    assert next(U.iter_jsonl(f)) == (1, {"i": 0})  # lazily: rows before the bad line are usable


def test_metrics_log_appends_on_rank0_only(tmp_path, monkeypatch):
    log = U.MetricsLog(tmp_path / "m.jsonl")
    log.write(step=1, loss=0.5)
    monkeypatch.setenv("RANK", "1")
    log.write(step=2, loss=0.4)
    rows = U.read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == [1] and "time" in rows[0]


def test_setup_distributed_single_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = U.setup_distributed(device="cpu")
    assert (d.rank, d.world_size, d.is_main, d.enabled, d.device.type) == (0, 1, True, False, "cpu")
    U.cleanup_distributed()  # a no-op without a group


def test_setup_distributed_two_processes_gloo(tmp_path):
    """torchrun-style launch (RANK/WORLD_SIZE/MASTER_*): two CPU processes join a gloo group."""
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, torch; sys.path.insert(0, %r)\n"
        "from lib import utils as U\n"
        "d = U.setup_distributed(device='cpu')\n"
        "x = torch.tensor([float(d.rank + 1)]); torch.distributed.all_reduce(x)\n"
        "print(d.rank, d.world_size, torch.distributed.get_backend(), x.item())\n"
        "U.cleanup_distributed()\n" % str(ROOT))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(script)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, text=True) for r in range(2)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert outs == ["0 2 gloo 3.0", "1 2 gloo 3.0"]


def test_adamw_foreach_is_bit_identical_to_the_per_tensor_loop():
    """U.adamw only changes speed: the same weights, bit for bit, as PyTorch's CPU default."""
    def train(make_opt):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Flatten(),
                                  torch.nn.Linear(8 * 6 * 6, 4))
        opt = make_opt([{"params": net[:2].parameters(), "lr": 1e-2}, {"params": net[3].parameters(), "lr": 3e-3}])
        for step in range(6):
            x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(step))
            for g, base in zip(opt.param_groups, (1e-2, 3e-3)):
                g["lr"] = base * (step + 1) / 6
            opt.zero_grad(set_to_none=True)
            net(x).pow(2).mean().backward()
            opt.step()
        return net.state_dict()
    ours = train(lambda groups: U.adamw(groups, weight_decay=0.01))
    loop = train(lambda groups: torch.optim.AdamW(groups, weight_decay=0.01, foreach=False))
    assert ours.keys() == loop.keys() and all(torch.equal(ours[k], loop[k]) for k in ours)
    assert not torch.equal(ours["3.weight"], train(lambda g: torch.optim.AdamW(g, weight_decay=0.1))["3.weight"])


def test_seed_everything_is_deterministic():
    U.seed_everything(5)
    a = torch.randn(3)
    U.seed_everything(5)
    assert torch.equal(a, torch.randn(3))


# --------------------------------------------------------------------------------------
# Presets, run folders and settings: nothing can mislead or be silently overwritten
# --------------------------------------------------------------------------------------

@pytest.fixture
def demo_stage(monkeypatch):
    """A stage 'demo' with one flag, --alpha, and a preset entry for it in toy only."""
    monkeypatch.setitem(U.PRESETS["toy"], "demo", {"alpha": 1.5})
    monkeypatch.setitem(U.PRESETS["sd15"], "demo", {})

    def parse(argv):  # a new parser each time, as each stage process builds one
        p = U.stage_parser("demo", "demo stage")
        p.add_argument("--alpha", type=float)
        return U.parse_args(p, argv)
    return parse


def test_each_preset_has_its_own_default_run_folder(demo_stage):
    assert demo_stage([]).run == "runs/toy"
    assert demo_stage(["--preset", "sd15", "--alpha", "2"]).run == "runs/sd15"
    assert demo_stage(["--preset", "sd15", "--alpha", "2", "--run", "x"]).run == "x"


def test_a_flag_without_a_preset_default_stops_at_start(demo_stage):
    assert demo_stage([]).alpha == 1.5
    assert demo_stage(["--preset", "sd15", "--alpha", "2"]).alpha == 2.0  # given explicitly: fine
    with pytest.raises(SystemExit, match=r"preset 'sd15' gives no default for --alpha of stage demo"):
        demo_stage(["--preset", "sd15"])


def test_every_flag_of_every_command_has_an_entry_in_every_preset():
    """The stage scripts' parse() and every system command's parser, under each preset with
    and without --tiny: a flag without a preset entry would stop the command at start."""
    import importlib
    parsers = []
    for script in ("00_toy_world.py", "01_build_coarse.py", "02_train_scm.py", "03_build_hf.py", "04_train_spo.py",
                   "05_evaluate.py"):
        m = U.load_script(script)
        parsers.append((script, lambda argv, m=m: m.parse(argv)))
    for system in ("alignguard", "baselines", "attacks", "psa", "dfm_study"):  # draws: no preset
        for name, (parser, _) in importlib.import_module(f"systems.{system}").COMMANDS.items():
            parsers.append((f"{system} {name}", lambda argv, parser=parser: U.parse_args(parser(), argv)))
    assert len(parsers) == 6 + 8
    required = {"alignguard expert": ["--categories", "hate"], "alignguard merge": ["--merge-experts", "e"],
                "baselines build": ["--baseline", "uce"]}
    for what, parse in parsers:
        for preset in U.PRESETS:
            for tiny in ([], ["--tiny"]):
                parse(["--preset", preset, *tiny, *required.get(what, [])])  # SystemExit if a flag lacks an entry


def test_toy_world_inputs_are_refused_on_other_presets():
    toy = argparse.Namespace(preset="toy")
    assert U.toy_world_input(toy, Path("runs/toy/world/model"), "--model") == "runs/toy/world/model"
    with pytest.raises(SystemExit, match=r"--preset sd15: pass --model .*runs/sd15/world/model"):
        U.toy_world_input(argparse.Namespace(preset="sd15"), Path("runs/sd15/world/model"), "--model")


def test_save_config_refuses_a_folder_holding_other_settings(tmp_path):
    args = argparse.Namespace(lam=0.15, lora_rank=0, name="spo", stop_after=None, device=None, _stage="spo")
    U.save_config(args, tmp_path, world_size=1)
    U.save_config(argparse.Namespace(**{**vars(args), "stop_after": 4, "device": "cpu"}), tmp_path,
                  world_size=2)  # how the run is carried out may change: resumes
    changed = argparse.Namespace(**{**vars(args), "lora_rank": 4})
    with pytest.raises(SystemExit) as e:
        U.save_config(changed, tmp_path, world_size=1)
    msg = str(e.value)
    assert "holds a run with other settings (lora_rank: 0 -> 4)" in msg and "--name NAME" in msg
    assert U.read_json(tmp_path / "config.json")["lora_rank"] == 0  # nothing overwritten
    # a flag the folder's run did not know yet (added since, defaulting to the old behaviour)
    U.save_config(argparse.Namespace(**{**vars(args), "pair_subset": 0}), tmp_path, world_size=1)
    # ... or with another default: the folder ran with what `absent_means` says it did
    keep = lambda v: argparse.Namespace(**{**vars(args), "keep": v})
    with pytest.raises(SystemExit, match="keep: 'safer' -> 'harm-free'"):
        U.save_config(keep("harm-free"), tmp_path, absent_means={"keep": "safer"}, world_size=1)
    U.save_config(keep("safer"), tmp_path, absent_means={"keep": "safer"}, world_size=1)
    U.save_config(changed, tmp_path, check=False, world_size=1)  # stage 5: an additive cache
    assert U.read_json(tmp_path / "config.json")["lora_rank"] == 4


def test_a_judged_stage_resumes_wherever_its_judge_now_lives(tmp_path):
    """The judge's address, timeout and retries decide how it is reached, not what it answers:
    a run resumes with others. Its model decides what is computed: another stops the run."""
    judged = dict(judge="openai", judge_model="gpt-4o", judge_base_url="http://10.0.0.1:8000/v1", judge_timeout=60.0,
                  judge_retries=5, _stage="coarse")
    U.save_config(argparse.Namespace(**judged), tmp_path)
    U.save_config(argparse.Namespace(**{**judged, "judge_base_url": "http://127.0.0.1:9/v1", "judge_timeout": 5.0,
                                        "judge_retries": 0}), tmp_path)
    with pytest.raises(SystemExit, match=r"judge_model: 'gpt-4o' -> 'qwen2-vl'"):
        U.save_config(argparse.Namespace(**{**judged, "judge_model": "qwen2-vl"}), tmp_path)


def test_save_config_takes_a_moved_run_folder_for_the_same_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = lambda run: argparse.Namespace(run=str(run), model=str(run / "world" / "model"), lam=0.15)
    U.save_config(args(a), a / "spo")
    shutil.copytree(a, b)
    U.save_config(args(b), b / "spo")  # paths inside the run folder moved with it
    with pytest.raises(SystemExit, match="other settings"):
        U.save_config(argparse.Namespace(**{**vars(args(b)), "model": "elsewhere"}), b / "spo")


def test_run_stage_turns_user_errors_into_one_message(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); from lib import utils as U\n"
            "def main(): U.read_jsonl(%r)\n"
            "U.run_stage(main)\n") % (str(ROOT), str(tmp_path / "absent.jsonl"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {tmp_path / 'absent.jsonl'}: file not found"


def test_use_threads_sets_the_count_and_refuses_a_negative_one():
    before = torch.get_num_threads()
    try:
        U.use_threads(argparse.Namespace(threads=0))  # torch's default, untouched
        assert torch.get_num_threads() == before
        U.use_threads(argparse.Namespace(threads=3))
        assert torch.get_num_threads() == 3
        with pytest.raises(SystemExit, match="--threads -1"):
            U.use_threads(argparse.Namespace(threads=-1))
    finally:
        torch.set_num_threads(before)


def test_metrics_log_truncate_keeps_each_step_once(tmp_path):
    log = U.MetricsLog(tmp_path / "log.jsonl")
    for s in (1, 2, 3):
        log.write(step=s)
    log.truncate(lambda r: r["step"] <= 1)  # resumed from a checkpoint at step 1
    for s in (2, 3):
        log.write(step=s)
    assert [r["step"] for r in U.read_jsonl(tmp_path / "log.jsonl")] == [1, 2, 3]
    U.MetricsLog(tmp_path / "none.jsonl").truncate(lambda r: False)  # no file: nothing to do
    assert not (tmp_path / "none.jsonl").exists()


class RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_a_checkpoint_holding_anything_but_tensors_and_values_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = U.Checkpoint(tmp_path / "ckpt" / "train_state.pt")
    assert ckpt.load() is None
    ckpt.save({"model": {"w": torch.ones(2)}, "step": 3, "totals": {"aug_wins": {"sharpen": 1}}, "mu": -1.5})
    state = ckpt.load()
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.ones(2)) and state["mu"] == -1.5
    torch.save({"step": RunsCode()}, ckpt.path)
    with pytest.raises(U.DataError, match=r"train_state.pt: refused, it holds more than tensors and plain values"):
        ckpt.load()
    assert not (tmp_path / "PWNED").exists()


def test_step_generator_streams_share_no_seed():
    """Every (step, stream) that stage 4 draws on the sd15 preset (15,000 steps; stream 0 for t
    and ε, streams 1..12 for the hard pairs of a batch of 12) has a seed of its own; the same
    triple always gives the same draws."""
    seeds = {U.step_seed(0, step, stream) for step in range(15_000) for stream in range(13)}
    assert len(seeds) == 15_000 * 13
    assert U.step_seed(0, 5, 7) != U.step_seed(0, 6, 0)  # the affine seed's collision
    assert U.step_seed(1, 5, 0) != U.step_seed(0, 5, 0)
    assert U.step_generator(0, 5, 7).initial_seed() == U.step_seed(0, 5, 7)
    a, b = (torch.randn(4, generator=U.step_generator(3, 9, 2)) for _ in range(2))
    assert torch.equal(a, b)
