"""bench/bringup.py: two simulated nodes of 2 processes each on loopback (gloo) pass every stage against the
single-process reference, a wrong setting on one node (another seed) is caught, and a world that does not match
the config is a named error before anything is launched."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import trainer_fixtures as fx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import bringup  # noqa: E402
from train.config import make_config  # noqa: E402
from train.errors import ConfigError  # noqa: E402


def kd_toml(path: Path, w: dict) -> Path:
    path.write_text(f'[model]\npath = "{w["student"]}"\n[data]\npaths = ["{w["data"]}"]\nseq_len = 64\n'
                    f'cache_dir = "{w["root"] / "cache"}"\n[teachers]\nk = 8\n[teachers.teacher]\n'
                    f'path = "{w["teacher"]}"\n[optim]\nlr = 1e-3\n')
    return path


def simulate(config: Path, work: Path, port: int, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "bench" / "bringup.py"), "--simulate", "--config", str(config), "--nnodes",
           "2", "--nproc-per-node", "2", "--work", str(work), "--master-port", str(port), "--steps", "4",
           "--eval-fraction", "0.25", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def verdicts(out: str) -> dict:
    return {line.split(":")[0]: line.split(":", 1)[1].split()[0] for line in out.splitlines()
            if line.startswith("stage ")}


def test_world_that_does_not_match_the_config_is_a_named_error(tmp_path, capsys):
    cfg = make_config("kd", None, ["model.path=s", "data.paths=r.jsonl", "teachers.t.path=t"])
    world = bringup.World(2, 2, 0, "127.0.0.1", 29500)
    assert bringup.check_world(cfg, world, 1) == "cpu"
    bad = make_config("kd", None, ["model.path=s", "data.paths=r.jsonl", "teachers.t.path=t",
                                   "parallel.shard_group=3"])
    with pytest.raises(ConfigError, match="shard_group=3 does not divide the world of 2 nodes x 2"):
        bringup.check_world(bad, world, 1)
    with pytest.raises(ConfigError, match="--ref-nproc 3"):
        bringup.check_world(cfg, world, 3)
    with pytest.raises(ConfigError, match="--node-rank 2 is outside --nnodes 2"):
        bringup.check_world(cfg, bringup.World(2, 2, 2, "127.0.0.1", 29500), 1)
    cfg.run.device = "cuda"
    with pytest.raises(ConfigError, match="GPU"):
        bringup.check_world(cfg, world, 1)
    # Through the CLI: exit 2 and one line, nothing launched, no work directory.
    toml = tmp_path / "kd.toml"
    toml.write_text('[model]\npath = "s"\n[data]\npaths = ["r.jsonl"]\n[teachers.t]\npath = "t"\n'
                    '[parallel]\nshard_group = 3\n')
    assert bringup.main(["--simulate", "--config", str(toml), "--nnodes", "2", "--nproc-per-node", "2",
                         "--work", str(tmp_path / "work")]) == 2
    assert "does not divide the world" in capsys.readouterr().err and not (tmp_path / "work").exists()


def test_compare_names_missing_steps():
    ref = {s: {"step": s, "loss": 1.0} for s in (1, 2, 3)}
    assert bringup.compare({1: {"loss": 1.5}, 2: {"loss": 1.0}, 3: {"loss": 0.75}}, ref, range(1, 4)) == (0.5, "")
    worst, problem = bringup.compare({1: {"loss": 1.0}}, ref, range(1, 4))
    assert worst == float("inf") and "step(s) [2, 3]" in problem


@pytest.mark.slow
def test_simulated_two_nodes_pass_and_a_wrong_seed_is_caught(tmp_path):
    """Stage 1 (tiny) and every stage 2 (replicate, shard, expert, hsdp, kill + resume auto, async save + reload)
    pass at the CPU tolerance, with an MoE teacher of 4 experts (2 per rank under expert placement); then node 1
    alone with run.seed=1 draws other batches and stage 1 fails (exit 1), the rest not run. About 6 minutes on 2
    cores."""
    w = fx.make_world(tmp_path / "world")
    w["teacher"] = str(fx.make_model(tmp_path / "world" / "moe-teacher", w["vocab"], Path(w["tok"]), seed=3,
                                     moe=True, dim=48, hidden=64))
    config = kd_toml(tmp_path / "kd.toml", w)
    good = simulate(config, tmp_path / "good", 29611)
    v = verdicts(good.stdout)
    assert v == {"stage 1 tiny": "PASS", "stage 2 replicate": "PASS", "stage 2 shard": "PASS",
                 "stage 2 expert": "PASS", "stage 2 hsdp": "PASS", "stage 2 kill": "PASS", "stage 2 async": "PASS"}, good.stdout
    assert good.returncode == 0
    (resume_log,) = (tmp_path / "good" / "logs").glob("*-kill-node0-resume.log")
    assert "resuming from" in resume_log.read_text()  # the relaunch continued from the killed run's checkpoint

    wrong = simulate(config, tmp_path / "wrong", 29711, "--stages", "1", "--node-args", "1:--run.seed=1")
    assert verdicts(wrong.stdout) == {"stage 1 tiny": "FAIL"} and wrong.returncode == 1, wrong.stdout
