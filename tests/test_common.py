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

import common as C
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_import_leaves_heavy_libraries_alone():
    """`import common` stays light: diffusers, transformers and open_clip load only inside
    the functions that need them."""
    code = "import sys, common; print(sorted(m for m in ('diffusers', 'transformers', 'open_clip') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_sample_dtype_explicit_and_auto(monkeypatch):
    assert [C.sample_dtype(n, "cpu") for n in ("float32", "bfloat16", "float16")] == [
        torch.float32, torch.bfloat16, torch.float16]
    # "auto" on a CPU: bf16 only with native bf16 instructions, else fp32 (emulated bf16 is slower)
    monkeypatch.setattr(C, "_cpu_flags", lambda: "flags\t: fpu avx2 avx512f avx512_bf16 avx512_vnni")
    assert C.sample_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(C, "_cpu_flags", lambda: "flags\t: fpu avx2 amx_bf16 amx_tile")
    assert C.sample_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(C, "_cpu_flags", lambda: "flags\t: fpu avx2 avx512f avx512bw")
    assert C.sample_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(C, "_cpu_flags", lambda: "")  # not Linux
    assert C.sample_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        C.sample_dtype("fp8", "cpu")


def test_parse_args_preset_defaults_tiny_and_explicit_flags(monkeypatch):
    monkeypatch.setitem(C.PRESETS, "toy", {"demo": {"steps": 100, "lr": 0.1}})
    monkeypatch.setitem(C.PRESETS, "sd15", {"demo": {"steps": 5000, "lr": 1e-5}})
    monkeypatch.setitem(C.TINY, "demo", {"steps": 3})
    monkeypatch.setitem(C.STAGES, "demo", ("demo.py", "demo"))

    def parser():
        p = C.stage_parser("demo", "demo stage")
        p.add_argument("--steps", type=int)
        p.add_argument("--lr", type=float)
        return p

    a = C.parse_args(parser(), [])
    assert (a.preset, a.steps, a.lr, a.run) == ("toy", 100, 0.1, "runs/toy")
    a = C.parse_args(parser(), ["--preset", "sd15"])
    assert (a.steps, a.lr) == (5000, 1e-5)
    a = C.parse_args(parser(), ["--tiny"])
    assert (a.steps, a.lr) == (3, 0.1)
    a = C.parse_args(parser(), ["--tiny", "--steps", "7"])
    assert a.steps == 7  # an explicit flag beats preset and tiny


def test_parse_args_rejects_preset_key_without_flag(monkeypatch):
    monkeypatch.setitem(C.PRESETS, "toy", {"demo": {"nonexistent": 1}})
    monkeypatch.setitem(C.STAGES, "demo", ("demo.py", "demo"))
    with pytest.raises(ValueError, match="nonexistent"):
        C.parse_args(C.stage_parser("demo", ""), [])


def test_save_config_and_stage_dir(tmp_path):
    p = C.stage_parser("scm", "")
    a = C.parse_args(p, ["--run", str(tmp_path), "--seed", "3"])
    out = C.stage_dir(a.run, "scm")
    assert out == tmp_path / "scm"
    C.save_config(a, out, extra_setting=1)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seed"] == 3 and cfg["extra_setting"] == 1 and cfg["run"] == str(tmp_path)
    assert "_stage" not in cfg


def test_require_inputs_names_the_stage_to_run(tmp_path):
    with pytest.raises(SystemExit, match="02_train_scm.py"):
        C.require_inputs([tmp_path / "scm" / "scm.safetensors"], "scm")
    C.require_inputs([tmp_path], "scm")  # present: no error


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    f = tmp_path / "sub" / "x.json"
    C.atomic_write_json(f, {"a": 1})
    C.atomic_write_json(f, {"a": 2})
    assert json.loads(f.read_text()) == {"a": 2}
    assert [p.name for p in f.parent.iterdir()] == ["x.json"]


def test_atomic_write_failure_keeps_old_content(tmp_path):
    f = tmp_path / "x.txt"
    C.atomic_write_text(f, "old")

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        C.atomic_write_json(f, {"bad": Boom()})  # json fails before anything is written
    with pytest.raises(TypeError):
        C.atomic_write_bytes(f, "not bytes")  # write fails mid-way: temp file removed
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_jsonl_roundtrip_and_line_numbered_errors(tmp_path):
    f = tmp_path / "rows.jsonl"
    C.write_jsonl(f, [{"i": 0}, {"i": 1}])
    assert C.read_jsonl(f) == [{"i": 0}, {"i": 1}]
    f.write_text('{"i": 0}\n\n{"i": 1\n')
    with pytest.raises(C.DataError, match=r"rows.jsonl:3: malformed JSON"):
        C.read_jsonl(f)
    f.write_text('{"i": 0}\n[1, 2]\n')
    with pytest.raises(C.DataError, match=r"rows.jsonl:2: expected a JSON object"):
        C.read_jsonl(f)
    with pytest.raises(C.DataError, match="not found"):
        C.read_jsonl(tmp_path / "missing.jsonl")
    assert next(C.iter_jsonl(f)) == (1, {"i": 0})  # lazily: rows before the bad line are usable


def test_metrics_log_appends_on_rank0_only(tmp_path, monkeypatch):
    log = C.MetricsLog(tmp_path / "m.jsonl")
    log.write(step=1, loss=0.5)
    monkeypatch.setenv("RANK", "1")
    log.write(step=2, loss=0.4)
    rows = C.read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == [1] and "time" in rows[0]


def test_setup_distributed_single_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = C.setup_distributed(device="cpu")
    assert (d.rank, d.world_size, d.is_main, d.enabled, d.device.type) == (0, 1, True, False, "cpu")
    C.cleanup_distributed()  # a no-op without a group


def test_setup_distributed_two_processes_gloo(tmp_path):
    """torchrun-style launch (RANK/WORLD_SIZE/MASTER_*): two CPU processes join a gloo group."""
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, torch; sys.path.insert(0, %r)\n"
        "import common as C\n"
        "d = C.setup_distributed(device='cpu')\n"
        "x = torch.tensor([float(d.rank + 1)]); torch.distributed.all_reduce(x)\n"
        "print(d.rank, d.world_size, torch.distributed.get_backend(), x.item())\n"
        "C.cleanup_distributed()\n" % str(ROOT))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(script)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, text=True) for r in range(2)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert outs == ["0 2 gloo 3.0", "1 2 gloo 3.0"]


def test_adamw_foreach_is_bit_identical_to_the_per_tensor_loop():
    """C.adamw only changes speed: the same weights, bit for bit, as PyTorch's CPU default."""
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
    ours = train(lambda groups: C.adamw(groups, weight_decay=0.01))
    loop = train(lambda groups: torch.optim.AdamW(groups, weight_decay=0.01, foreach=False))
    assert ours.keys() == loop.keys() and all(torch.equal(ours[k], loop[k]) for k in ours)
    assert not torch.equal(ours["3.weight"], train(lambda g: torch.optim.AdamW(g, weight_decay=0.1))["3.weight"])


def test_seed_everything_is_deterministic():
    C.seed_everything(5)
    a = torch.randn(3)
    C.seed_everything(5)
    assert torch.equal(a, torch.randn(3))


# --------------------------------------------------------------------------------------
# Presets, run folders and settings: nothing can mislead or be silently overwritten
# --------------------------------------------------------------------------------------

@pytest.fixture
def demo_stage(monkeypatch):
    """A stage 'demo' with one flag, --alpha, and a preset entry for it in toy only."""
    monkeypatch.setitem(C.PRESETS["toy"], "demo", {"alpha": 1.5})
    monkeypatch.setitem(C.PRESETS["sd15"], "demo", {})

    def parse(argv):  # a new parser each time, as each stage process builds one
        p = C.stage_parser("demo", "demo stage")
        p.add_argument("--alpha", type=float)
        return C.parse_args(p, argv)
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


def test_every_stage_flag_has_an_entry_in_every_preset():
    import importlib.util
    for script in ("00_toy_world.py", "01_build_coarse.py", "02_train_scm.py", "03_build_hf.py", "04_train_spo.py",
                   "05_evaluate.py"):
        spec = importlib.util.spec_from_file_location(script[:-3], ROOT / script)
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        for preset in C.PRESETS:
            for tiny in ([], ["--tiny"]):
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(sys, "argv", [script, "--preset", preset, *tiny])
                    m.parse()  # raises SystemExit if any flag lacks a preset entry


def test_toy_world_inputs_are_refused_on_other_presets():
    toy = argparse.Namespace(preset="toy")
    assert C.toy_world_input(toy, Path("runs/toy/world/model"), "--model") == "runs/toy/world/model"
    with pytest.raises(SystemExit, match=r"--preset sd15: pass --model .*runs/sd15/world/model"):
        C.toy_world_input(argparse.Namespace(preset="sd15"), Path("runs/sd15/world/model"), "--model")


def test_save_config_refuses_a_folder_holding_other_settings(tmp_path):
    args = argparse.Namespace(lam=0.15, lora_rank=0, name="spo", stop_after=None, device=None, _stage="spo")
    C.save_config(args, tmp_path, world_size=1)
    C.save_config(argparse.Namespace(**{**vars(args), "stop_after": 4, "device": "cpu"}), tmp_path,
                  world_size=2)  # how the run is carried out may change: resumes
    changed = argparse.Namespace(**{**vars(args), "lora_rank": 4})
    with pytest.raises(SystemExit) as e:
        C.save_config(changed, tmp_path, world_size=1)
    msg = str(e.value)
    assert "holds a run with other settings (lora_rank: 0 -> 4)" in msg and "--name NAME" in msg
    assert C.read_json(tmp_path / "config.json")["lora_rank"] == 0  # nothing overwritten
    # a flag the folder's run did not know yet (added since, defaulting to the old behaviour)
    C.save_config(argparse.Namespace(**{**vars(args), "pair_subset": 0}), tmp_path, world_size=1)
    C.save_config(changed, tmp_path, check=False, world_size=1)  # stage 5: an additive cache
    assert C.read_json(tmp_path / "config.json")["lora_rank"] == 4


def test_save_config_takes_a_moved_run_folder_for_the_same_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = lambda run: argparse.Namespace(run=str(run), model=str(run / "world" / "model"), lam=0.15)
    C.save_config(args(a), a / "spo")
    shutil.copytree(a, b)
    C.save_config(args(b), b / "spo")  # paths inside the run folder moved with it
    with pytest.raises(SystemExit, match="other settings"):
        C.save_config(argparse.Namespace(**{**vars(args(b)), "model": "elsewhere"}), b / "spo")


def test_run_stage_turns_user_errors_into_one_message(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); import common as C\n"
            "def main(): C.read_jsonl(%r)\n"
            "C.run_stage(main)\n") % (str(ROOT), str(tmp_path / "absent.jsonl"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {tmp_path / 'absent.jsonl'}: file not found"


def test_metrics_log_truncate_keeps_each_step_once(tmp_path):
    log = C.MetricsLog(tmp_path / "log.jsonl")
    for s in (1, 2, 3):
        log.write(step=s)
    log.truncate(lambda r: r["step"] <= 1)  # resumed from a checkpoint at step 1
    for s in (2, 3):
        log.write(step=s)
    assert [r["step"] for r in C.read_jsonl(tmp_path / "log.jsonl")] == [1, 2, 3]
    C.MetricsLog(tmp_path / "none.jsonl").truncate(lambda r: False)  # no file: nothing to do
    assert not (tmp_path / "none.jsonl").exists()
