"""Bring-up of a multi-node run: does this cluster train the config the way one process does?

    # on every node (node 0 also runs the references and prints the verdicts), work dir on the shared filesystem:
    python bench/bringup.py --config kd.toml --nnodes 4 --nproc-per-node 8 --node-rank R \\
        --master-addr HOST0 --master-port 29500 --work /shared/bringup [--steps 20] [-- --more.overrides=...]
    # or all nodes simulated on this machine (loopback, gloo on the CPU):
    python bench/bringup.py --simulate --config kd.toml --nnodes 2 --nproc-per-node 2 --work /tmp/bringup

Stages (`STAGES`; each prints one verdict line on node 0, e.g. `stage 2 shard: PASS max |loss - ref| = 3e-07 (tol
1e-05)`, and a FAIL stops the nodes after that stage):
    1 tiny       tiny random models, tokenizer and rows made here (tests/trainer_fixtures.py) on every node: the
                 launch, the rendezvous, the collectives and the shared filesystem, in seconds
    2 replicate  the config's models for --steps steps, online teacher replicated on every rank
    2 shard      the same, teacher FSDP-sharded over the node's ranks (teachers.<name>.placement = "shard")
    2 expert     the same, an MoE teacher's experts spread over the node's ranks, tokens moved by all-to-all
                 (placement = "expert"; skipped for a dense teacher or experts that do not split over a node)
    2 hsdp       student under FSDP2 as replicate x shard with one shard group per node (needs >= 2 nodes)
    2 kill       the last node is SIGKILLed (its torchrun and every worker) once the first checkpoint is complete;
                 all nodes relaunch with --resume auto and finish the run
    2 async      a checkpoint saved asynchronously half-way while training goes on, then copied to a fresh run
                 directory and reloaded there (--resume auto) to finish the run
Every stage's losses (each step's, and the held-out val_ce / val_kd the stages add) are compared with a reference
run of the same config on the same batches: --ref-nproc processes on node 0 (default 1), with data.grad_accum
scaled so that the global batch is the same (DESIGN decision 2: the objective does not depend on the split).
The tolerance is absolute on per-token losses: 1e-4 on the CPU (fp32; 2 x 2 simulated ranks measured 4.1e-7 here,
one node with another seed 2.6e-2) and 5e-2 on GPUs (bf16 matmuls and other reduction orders over 20 steps: a guess,
not yet measured on a cluster); --tol overrides it.

The lead extends `STAGES` (e.g. an "expert" placement) with one line: a name, overrides (placeholders {teacher},
{nproc}) and the condition under which it applies.

Errors before anything is launched (train.errors.ConfigError, exit 2): a world that does not match the config
(parallel.shard_group that does not divide nnodes x nproc-per-node, a global batch the reference cannot reproduce,
fewer GPUs than --nproc-per-node on a CUDA run, --node-rank outside --nnodes), a work directory that is not empty.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from train.config import make_config  # noqa: E402
from train.errors import ConfigError, UserError  # noqa: E402

COMPARED = ("loss", "val_ce", "val_kd")  # val_top1 is a count of argmax ties: one flip moves it by 1/tokens
DEFAULT_TOL = {"cpu": 1e-4, "cuda": 5e-2}
_POLL_S = 0.05


@dataclass
class Stage:
    number: int
    name: str
    overrides: dict = field(default_factory=dict)  # values may hold {teacher} and {nproc}
    needs: str = ""                                # "online" (an online teacher), "moe" (an online MoE teacher
                                                   # whose experts split over a node), "nodes" (>= 2 nodes)
    kind: str = "run"                              # run | kill | async
    tiny: bool = False


STAGES = [
    Stage(1, "tiny", tiny=True),
    Stage(2, "replicate", {"teachers.{teacher}.shard": "false", "teachers.{teacher}.placement": "replicate"},
          needs="online"),
    Stage(2, "shard", {"teachers.{teacher}.shard": "false", "teachers.{teacher}.placement": "shard"}, needs="online"),
    Stage(2, "expert", {"teachers.{teacher}.shard": "false", "teachers.{teacher}.placement": "expert"}, needs="moe"),
    Stage(2, "hsdp", {"parallel.strategy": "fsdp", "parallel.shard_group": "{nproc}"}, needs="nodes"),
    Stage(2, "kill", {"checkpoint.async_save": "false"}, kind="kill", needs="nodes"),
    Stage(2, "async", {"checkpoint.async_save": "true"}, kind="async"),
]


def _no_expert_placement(cfg, online: list, nproc: int) -> str:
    """Why the expert stage cannot run ('' when it can): the first online teacher must be an MoE whose experts
    split whole over the ranks of a node."""
    from train.preflight import read_model_args
    name = online[0]
    a = read_model_args(cfg.teachers.named[name].path, f"teachers.{name}.path")
    if a.moe is None:
        return f"teacher {name!r} is dense (expert placement needs an MoE teacher)"
    if a.moe.num_experts % nproc:
        return f"teacher {name!r} has {a.moe.num_experts} experts, which do not split over {nproc} ranks per node"
    return ""


# ------------------------------------------------------------------------------------------------------------
# The world against the config


@dataclass
class World:
    nnodes: int
    nproc: int
    node_rank: int
    addr: str
    port: int

    @property
    def size(self) -> int:
        return self.nnodes * self.nproc


def check_world(cfg, world: World, ref_nproc: int) -> str:
    """The device type of the runs; ConfigError when the world cannot run the config (module doc)."""
    if not 0 <= world.node_rank < world.nnodes:
        raise ConfigError(f"--node-rank {world.node_rank} is outside --nnodes {world.nnodes}; use 0..{world.nnodes - 1}")
    g = cfg.parallel.shard_group
    if g and world.size % g:
        raise ConfigError(f"parallel.shard_group={g} does not divide the world of {world.nnodes} nodes x "
                          f"{world.nproc} processes = {world.size}; set --nnodes/--nproc-per-node to match the config "
                          f"or parallel.shard_group to a divisor of {world.size}")
    micro_per_step = cfg.data.grad_accum * world.size
    if micro_per_step % ref_nproc:
        raise ConfigError(f"the reference on --ref-nproc {ref_nproc} process(es) cannot take the global batch of "
                          f"{world.size} ranks x data.grad_accum {cfg.data.grad_accum} (micro-batches per step "
                          f"{micro_per_step} must divide over {ref_nproc}); choose --ref-nproc dividing {micro_per_step}")
    import torch
    device = cfg.run.device if cfg.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and torch.cuda.device_count() < world.nproc:
        raise ConfigError(f"run.device=cuda with --nproc-per-node {world.nproc}, but this node has "
                          f"{torch.cuda.device_count()} GPU(s); lower --nproc-per-node or check CUDA_VISIBLE_DEVICES")
    return device


# ------------------------------------------------------------------------------------------------------------
# Launching


def torchrun(world: World, port: int, args: list, log: Path) -> subprocess.Popen:
    """This node's torchrun of train/main.py (static rendezvous at --master-addr:port), output into `log`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(world.nnodes), "--nproc-per-node",
           str(world.nproc), "--node-rank", str(world.node_rank), "--master-addr", world.addr, "--master-port",
           str(port), str(REPO / "train" / "main.py"), *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)


def reference(sub: str, config: str, args: list, nproc: int, log: Path) -> int:
    """The reference run on this node alone: one process in-process-style, or `nproc` under torchrun --standalone."""
    main = str(REPO / "train" / "main.py")
    cmd = ([sys.executable, main] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), main])
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.run(cmd + [sub, "--config", config, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}).returncode


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, as a node dying would: torchrun starts each worker in a session of
    its own (torch.distributed.elastic), so killing torchrun's process group would leave the workers running."""
    children: dict = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def last_error(log: Path) -> str:
    """The trainer's own error line (`config error: ...`, `error: ...`), else the last exception line of a log."""
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.exists() else []
    for pick in (lambda x: x.startswith(("config error:", "error:")),
                 lambda x: "Error" in x.split(":")[0] and not x.startswith("torch.distributed.elastic")):
        found = [x for x in lines if pick(x)]
        if found:
            return found[-1][:300]
    return lines[-1][:300] if lines else f"no output in {log}"


def wait_for(path: Path, what: str, timeout_s: float) -> dict:
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{what}: {path} did not appear within {timeout_s:.0f} s")
        time.sleep(_POLL_S)
    time.sleep(_POLL_S)  # written by one rename; a reader on another node may see it a moment late
    return json.loads(path.read_text())


def publish(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------------
# Comparing


def records(run_dir: Path) -> dict:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return {}
    return {r["step"]: r for r in (json.loads(x) for x in f.read_text().splitlines() if x.strip())}


def compare(run: dict, ref: dict, steps: range) -> tuple[float, str]:
    """(max |value - ref| over COMPARED at `steps`, a problem or "")."""
    missing = [s for s in steps if s not in run or s not in ref]
    if missing:
        return float("inf"), f"no record of step(s) {missing[:5]} in the {'run' if any(s not in run for s in missing) else 'reference'}"
    worst = 0.0
    for s in steps:
        for key in COMPARED:
            if (key in run[s]) != (key in ref[s]):
                return float("inf"), f"step {s}: {key} in only one of run and reference"
            if key in run[s]:
                worst = max(worst, abs(run[s][key] - ref[s][key]))
    return worst, ""


# ------------------------------------------------------------------------------------------------------------
# One node


class Node:
    def __init__(self, a, world: World):
        self.a, self.world, self.work = a, world, Path(a.work).resolve()
        self.extra = list(a.train_args)
        self.main = world.node_rank == 0
        self.refs: dict = {}

    def say(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    # The two configs: the tiny world (made here) and the user's

    def tiny_config(self) -> tuple[str, dict]:
        root, ready = self.work / "tiny", self.work / "tiny.ready"
        if self.main:
            sys.path.insert(0, str(REPO / "tests"))
            import trainer_fixtures as fx
            # ~3 rows per 64-token sequence: eval.fraction 0.25 then holds out >= 1 sequence per rank of the world
            w = fx.make_world(root, n_rows=max(48, 16 * self.world.size))
            toml = root / "tiny.toml"
            toml.write_text(f'[model]\npath = "{w["student"]}"\n[data]\npaths = ["{w["data"]}"]\nseq_len = 64\n'
                            f'cache_dir = "{root / "cache"}"\n[teachers]\nk = 8\n[teachers.teacher]\n'
                            f'path = "{w["teacher"]}"\n[optim]\nlr = 1e-3\n')
            publish(ready, {"config": str(toml)})
        cfg = wait_for(ready, "the tiny world (node 0 makes it)", 600)["config"]
        return cfg, {"schedule.steps": str(self.a.tiny_steps), "eval.fraction": "0.25"}

    def common(self, sub_cfg, steps: int, run_dir: Path, evaluating: bool) -> list:
        o = {"schedule.steps": steps, "logging.every": 1, "logging.progress": "false", "logging.plot": "false",
             "checkpoint.every": 0, "checkpoint.export_final": "false", "checkpoint.resume": "",
             "run.dir": str(run_dir)}
        if evaluating:  # the held-out metrics once, at the end
            o["eval.every"] = steps
        if evaluating or sub_cfg.eval.every:  # one sequence per rank of the world: the reference evaluates the same
            o["eval.max_tokens"] = self.world.size * sub_cfg.data.seq_len
        return [f"--{k}={v}" for k, v in o.items()]

    # Stages

    def run(self) -> int:
        a = self.a
        cfg = make_config(a.subcommand, a.config, self.extra)
        device = check_world(cfg, self.world, a.ref_nproc)
        if self.main:
            if self.work.exists() and any(self.work.iterdir()):
                raise ConfigError(f"--work {self.work} is not empty (an earlier bring-up?); give a new directory")
            self.work.mkdir(parents=True, exist_ok=True)
            publish(self.work / "work.ready", {})
        wait_for(self.work / "work.ready", "node 0's work directory", 600)
        tol = a.tol if a.tol is not None else DEFAULT_TOL[device]
        online = [n for n, s in cfg.teachers.named.items() if s.path] if a.subcommand != "sft" else []
        failed = False
        for i, st in enumerate(s for s in STAGES if s.name in a.stages.split(",") or str(s.number) in
                               a.stages.split(",")):
            label = f"stage {st.number} {st.name}"
            if failed:
                self.say(f"{label}: NOT RUN (an earlier stage failed)")
                continue
            why = ("no online teacher (a store is not placed)" if st.needs in ("online", "moe") and not online else
                   _no_expert_placement(cfg, online, self.world.nproc) if st.needs == "moe" else
                   "needs >= 2 nodes" if st.needs == "nodes" and self.world.nnodes < 2 else "")
            if why:
                self.say(f"{label}: SKIP {why}")
                continue
            verdict_file = self.work / f"verdict-{i}-{st.name}.json"
            port = self.world.port + 10 * (i + 1)
            if st.tiny:
                config, fixed = self.tiny_config()
                sub_cfg = make_config("kd", config, [])
                sub, steps = "kd", a.tiny_steps
            else:
                config, fixed, sub_cfg, sub, steps = a.config, {}, cfg, a.subcommand, a.steps
            evaluating = sub_cfg.eval.every == 0 and (st.tiny or a.eval_fraction > 0)
            if evaluating and not st.tiny:
                fixed = {**fixed, "eval.fraction": str(a.eval_fraction)}
            fmt = {"teacher": online[0] if online else "", "nproc": self.world.nproc}
            stage_o = [f"--{k.format(**fmt)}={v.format(**fmt)}" for k, v in {**fixed, **st.overrides}.items()]
            run_dir = self.work / f"{i}-{st.name}"
            args = [sub, "--config", config, *self.common(sub_cfg, steps, run_dir, evaluating), *stage_o, *self.extra]
            t0 = time.perf_counter()
            problem, checks = self.launch(st, i, args, run_dir, steps, port)
            if self.main:
                ok, detail = self.verdict(st, problem, checks, sub, config, sub_cfg, steps, fixed, evaluating, tol)
                self.say(f"{label}: {'PASS' if ok else 'FAIL'} {detail} [{time.perf_counter() - t0:.0f} s]")
                publish(verdict_file, {"ok": ok})
            failed = not wait_for(verdict_file, f"node 0's verdict on {label}", a.verdict_timeout_s)["ok"]
        return 1 if failed else 0

    def verdict(self, st: Stage, problem: str, checks: list, sub: str, config: str, sub_cfg, steps: int,
                fixed: dict, evaluating: bool, tol: float) -> tuple[bool, str]:
        """Node 0: the stage's records against the reference (run once per config, on this node, on the same
        global batches: data.grad_accum x world / --ref-nproc micro-batches per step)."""
        key = "tiny" if st.tiny else "real"
        if key not in self.refs:
            ga = sub_cfg.data.grad_accum * self.world.size // self.a.ref_nproc
            ref_dir, log = self.work / f"ref-{key}", self.work / "logs" / f"ref-{key}.log"
            args = (self.common(sub_cfg, steps, ref_dir, evaluating) + [f"--{k}={v}" for k, v in fixed.items()]
                    + [f"--data.grad_accum={ga}"] + self.extra)
            rc = reference(sub, config, args, self.a.ref_nproc, log)
            self.refs[key] = records(ref_dir), "" if rc == 0 else f"reference failed: {last_error(log)}"
        ref, ref_problem = self.refs[key]
        if problem or ref_problem:
            return False, problem or ref_problem
        diffs = [compare(records(d), ref, steps_) for d, steps_ in checks]
        worst, problem = max(w for w, _ in diffs), next((x for _, x in diffs if x), "")
        if problem:
            return False, problem
        runs = " and ".join(f"{d.name} steps {r.start}-{r.stop - 1}" for d, r in checks)
        return worst <= tol, f"max |loss - ref| = {worst:.1e} (tol {tol:.0e}) over {runs}"

    def launch(self, st: Stage, i: int, args: list, run_dir: Path, steps: int, port: int) -> tuple[str, list]:
        """Run the stage on this node: (problem or "", [(run directory, steps whose records must equal the
        reference's)])."""
        logs, me = self.work / "logs", self.world.node_rank
        everything = [(run_dir, range(1, steps + 1))]
        if st.kind == "run":
            log = logs / f"{i}-{st.name}-node{me}.log"
            rc = torchrun(self.world, port, args, log).wait()
            return ("" if rc == 0 else f"node {me}: exit {rc}: {last_error(log)}"), everything
        if st.kind == "kill":
            every = max(1, steps // 4)  # synchronous saves: step-{every} is complete when it appears
            victim = self.world.nnodes - 1
            log1 = logs / f"{i}-{st.name}-node{me}-first.log"
            proc = torchrun(self.world, port, args + [f"--checkpoint.every={every}"], log1)
            marker = self.work / f"killed-{i}.json"
            if me == victim:
                first = run_dir / f"step-{every}"
                while not first.exists() and proc.poll() is None:
                    time.sleep(_POLL_S)
                alive = proc.poll() is None
                if alive:
                    kill_tree(proc.pid)
                proc.wait()
                publish(marker, {"alive": alive})
            else:
                proc.wait()  # the peers' collectives fail once the victim's sockets close: a non-zero exit
            killed = wait_for(marker, f"node {victim}'s kill", self.a.verdict_timeout_s)
            if not killed["alive"]:
                return f"the run ended before node {victim} could kill it (raise --steps)", everything
            log2 = logs / f"{i}-{st.name}-node{me}-resume.log"
            rc = torchrun(self.world, port + 1, args + [f"--checkpoint.every={every}", "--checkpoint.resume=auto"],
                          log2).wait()
            if rc:
                return f"node {me}: resume exit {rc}: {last_error(log2)}", everything
            if self.main and not any("resuming from" in x for x in log2.read_text().splitlines()):
                return "the relaunch did not resume from a checkpoint", everything
            return "", everything
        assert st.kind == "async", st.kind
        every = steps // 2  # saved in the background while steps every+1.. run
        log1 = logs / f"{i}-{st.name}-node{me}-save.log"
        rc = torchrun(self.world, port, args + [f"--checkpoint.every={every}"], log1).wait()
        if rc:
            return f"node {me}: exit {rc}: {last_error(log1)}", everything
        reload_dir = run_dir.with_name(run_dir.name + "-reload")
        copied = self.work / f"copied-{i}.json"
        if self.main:
            shutil.copytree(run_dir / f"step-{every}", reload_dir / f"step-{every}")
            publish(copied, {})
        wait_for(copied, "node 0's copy of the checkpoint", self.a.verdict_timeout_s)
        log2 = logs / f"{i}-{st.name}-node{me}-reload.log"
        args2 = [x if not x.startswith("--run.dir=") else f"--run.dir={reload_dir}" for x in args]
        rc = torchrun(self.world, port + 1, args2 + ["--checkpoint.resume=auto"], log2).wait()
        if rc:
            return f"node {me}: reload exit {rc}: {last_error(log2)}", everything
        # The reloaded run's metrics.jsonl holds its own steps only (every+1..steps).
        return "", everything + [(reload_dir, range(every + 1, steps + 1))]


def simulate(a, argv: list) -> int:
    """Every node of the world as a process of this machine on loopback; node 0's output is this one's."""
    own = [x for x in argv if x != "--simulate"]
    train_args = own[own.index("--") + 1:] if "--" in own else []
    head = own[:own.index("--")] if "--" in own else own
    extra_for = {}
    for spec in a.node_args:
        rank, _, text = spec.partition(":")
        extra_for.setdefault(int(rank), []).extend(text.split())
    procs = []
    for r in range(a.nnodes):
        cmd = [sys.executable, __file__, *head, "--node-rank", str(r), "--master-addr", "127.0.0.1",
               "--", *train_args, *extra_for.get(r, [])]
        procs.append(subprocess.Popen(cmd))  # only node 0 prints, errors aside
    while all(p.poll() is None for p in procs):
        time.sleep(_POLL_S)
    if any(p.poll() for p in procs):  # a node failed: the others would wait for it at the next rendezvous
        time.sleep(5)
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
    rcs = [p.wait() for p in procs]
    return rcs[0] or max(rcs)


def parse(argv: list):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Arguments after -- are overrides of every training run on this node "
                                       "(e.g. -- --data.micro_batch=2).")
    p.add_argument("--config", required=True, help="the run's TOML (kd or dae; online teacher or store)")
    p.add_argument("--subcommand", default="kd", choices=("kd", "dae", "sft"))
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--nproc-per-node", type=int, required=True, dest="nproc")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29400)
    p.add_argument("--work", required=True, help="a new directory on the filesystem every node shares")
    p.add_argument("--stages", default="1,2", help="stage numbers or names, comma-separated (default 1,2)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps of each stage-2 run (default 20)")
    p.add_argument("--tiny-steps", type=int, default=4)
    p.add_argument("--ref-nproc", type=int, default=1, help="processes of the reference run on node 0 (default 1)")
    p.add_argument("--tol", type=float, default=None, help="max |loss - ref| (default: 1e-4 CPU, 5e-2 GPU)")
    p.add_argument("--eval-fraction", type=float, default=0.01,
                   help="eval.fraction the stage-2 runs hold out for val_* (0: none; ignored when the config sets eval)")
    p.add_argument("--verdict-timeout-s", type=float, default=7200)
    p.add_argument("--simulate", action="store_true", help="run every node here on loopback (gloo on the CPU)")
    p.add_argument("--node-args", action="append", default=[], metavar="RANK:ARGS",
                   help="--simulate: extra training overrides of one node, e.g. '1:--run.seed=1' (a wrong setting)")
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    a = p.parse_args(own)
    a.train_args = rest
    if a.steps < 4:
        p.error("--steps must be at least 4 (the kill and async stages checkpoint half-way)")
    return a


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    try:
        if a.simulate:
            make_config(a.subcommand, a.config, a.train_args)  # a bad config fails here, once, not on every node
            check_world(make_config(a.subcommand, a.config, a.train_args),
                        World(a.nnodes, a.nproc, 0, a.master_addr, a.master_port), a.ref_nproc)
            return simulate(a, argv)
        return Node(a, World(a.nnodes, a.nproc, a.node_rank, a.master_addr, a.master_port)).run()
    except UserError as e:
        print(f"{'config error' if isinstance(e, ConfigError) else 'error'}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
