"""Launching ``python -m lit_peft fit`` the ways a cluster does, on the tiny ViT and generated data of
``tests/test_cli.py`` with gloo on the CPU. Every job is a set of subprocesses bounded by ``LIMIT`` seconds, so a hang
fails the test instead of blocking the run.

- Two "nodes" on one machine, one process each: two ``torchrun --nnodes=2 --node_rank=0|1`` agents, and two
  ``python -m lit_peft`` processes with ``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK`` (Lightning's own launcher).
  Both ranks see world size 2 and their node rank, and global rank 0 alone writes the merged model.
- A rank that raises ends the whole job with its error: a callback raises on one global rank at step 1 while the
  other rank waits in a barrier or runs the step's collectives. Gloo reports the dead peer to the waiting rank
  ("Connection closed by peer"), so every process exits non-zero within seconds and none is left behind; under
  torchrun the failure summary names the failing rank and its exception (``lit_peft.cli.entry_point`` runs the CLI
  under torchelastic's ``record``).
- ``scripts/slurm_fit.sbatch`` run by bash with SLURM's variables set and a stand-in ``srun`` that records its
  command: with every shipped strategy overlay the command parses with the CLI (``--print_config``, in-process) and
  sets num_nodes, devices and (FSDP2) data_parallel_size from SLURM's variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.cli import REPO, cli_env, make_vtab_task, print_config, write_config
from helpers.distributed import NEEDS_GLOO, free_port

pytestmark = NEEDS_GLOO

LIMIT = 180  # seconds for a whole job; a fit of the tiny model takes about 30 on a busy 2-core machine
ERROR = "failed on purpose"

PROBES = '''
import json
import os
from pathlib import Path

import lightning as L


class RecordLaunch(L.Callback):
    """Writes ``launch-rank<global rank>.json`` at teardown: the ranks, the world size, the cluster environment and
    how often this rank called the module's ``save_merged_model``. Every process notes its PID in ``pids/``."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        (self.folder / "pids").mkdir(parents=True, exist_ok=True)
        (self.folder / "pids" / str(os.getpid())).touch()
        self.merges = 0

    def setup(self, trainer, pl_module, stage):
        save = pl_module.save_merged_model

        def counted(*args, **kwargs):
            self.merges += 1
            return save(*args, **kwargs)

        pl_module.save_merged_model = counted

    def teardown(self, trainer, pl_module, stage):
        record = {"global_rank": trainer.global_rank, "world_size": trainer.world_size,
                  "node_rank": trainer.node_rank, "num_nodes": trainer.num_nodes, "merges": self.merges,
                  "environment": type(trainer.strategy.cluster_environment).__name__}
        (self.folder / f"launch-rank{trainer.global_rank}.json").write_text(json.dumps(record))


class FailOnRank(L.Callback):
    """Global rank ``rank`` raises when training step ``step`` starts; the other ranks meanwhile wait in a barrier
    (``wait``) or go on into the step's collectives."""

    def __init__(self, rank: int, step: int = 1, wait: bool = True):
        self.rank, self.step, self.wait = rank, step, wait

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"rank {self.rank} ''' + ERROR + '''")
        if self.wait:
            trainer.strategy.barrier("FailOnRank")


class StallOnRank(L.Callback):
    """Global rank ``rank`` stops making progress (sleeps) when training step ``step`` starts; the others wait in a
    barrier, which the process-group timeout ends."""

    def __init__(self, rank: int, step: int = 1):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if trainer.global_rank == self.rank:
            import time
            time.sleep(3600)
        trainer.strategy.barrier("StallOnRank")
'''


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:  # an unreaped zombie has exited
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def launch(commands: list[list[str]], cwd: Path, envs: list[dict] | None = None) -> list[tuple[int, str]]:
    """Start ``commands`` together; ``(exit code, output)`` of each once all have ended. Past ``LIMIT`` seconds the
    test fails as a hang, after killing every process that the job started (their PIDs are in ``cwd/pids``)."""
    logs = [cwd / f"process{i}.log" for i in range(len(commands))]
    procs = []
    for command, env, log in zip(commands, envs or [{}] * len(commands), logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(command, cwd=cwd, env=cli_env(**env), stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline = time.monotonic() + LIMIT
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    hung = [proc.args for proc in procs if proc.poll() is None]
    started = [int(p.name) for p in (cwd / "pids").glob("*")]
    for _ in range(0 if hung else 20):  # a rank outliving its launcher by a few seconds is fine; one that stays is not
        if not any(alive(pid) for pid in started):
            break
        time.sleep(0.5)
    left = [pid for pid in started if alive(pid)]
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    outputs = [log.read_text(errors="replace") for log in logs]
    tails = "\n".join(f"--- {' '.join(p.args[:4])}\n{out[-3000:]}" for p, out in zip(procs, outputs))
    assert not hung, f"no exit within {LIMIT} s: {hung}\n{tails}"
    assert not left, f"processes left behind after the job: {left}\n{tails}"
    return [(proc.returncode, out) for proc, out in zip(procs, outputs)]


def torchrun(nnodes: int, node_rank: int, nproc: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}"]


@pytest.fixture
def job(tmp_path_factory):
    """``job(*callbacks)``: a fresh folder with the probes module and a config for a 1-epoch, 2-step (at 2 x 4 images
    per step) fit of the tiny ViT; returns the folder and the CLI arguments (``fit --config ...``)."""
    data_root = make_vtab_task(tmp_path_factory.mktemp("vtab"), sizes=(("train800", 16), ("val200", 4), ("test", 4)))

    def make(*callbacks: dict) -> tuple[Path, list[str]]:
        folder = tmp_path_factory.mktemp("job")
        (folder / "probes.py").write_text(PROBES)
        recorder = {"class_path": "probes.RecordLaunch", "init_args": {"folder": str(folder)}}
        adapter = {"class_path": "lit_peft.adapters.BOFT",
                   "init_args": {"block_size": 8, "n_butterfly_factors": 2, "dropout": 0.0, "target_modules": ["qkv"]}}
        config = write_config(folder, data_root, adapter, max_epochs=1, callbacks=[recorder, *callbacks])
        return folder, ["-m", "lit_peft", "fit", "--config", str(config), "--test_after_fit=null"]

    return make


def overlay(name: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "strategy" / f"{name}.yaml")]


@pytest.mark.parametrize("launcher", ["torchrun", "lightning"])
def test_two_nodes_on_one_machine(job, launcher):
    folder, cli = job()
    port = free_port()
    nodes = [*overlay("ddp"), "--trainer.num_nodes=2", "--trainer.devices=1"]  # after the overlay's devices: 2
    if launcher == "torchrun":
        commands = [[*torchrun(2, node, 1, port), *cli, *nodes] for node in (0, 1)]
        envs = None
    else:
        commands = [[sys.executable, *cli, *nodes]] * 2
        envs = [{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node)} for node in (0, 1)]
    results = launch(commands, folder, envs)
    assert [code for code, _ in results] == [0, 0], "\n".join(out[-3000:] for _, out in results)
    ranks = [json.loads((folder / f"launch-rank{r}.json").read_text()) for r in (0, 1)]
    environment = "TorchElasticEnvironment" if launcher == "torchrun" else "LightningEnvironment"
    for rank, record in enumerate(ranks):
        assert record == {"global_rank": rank, "world_size": 2, "node_rank": rank, "num_nodes": 2,
                          "merges": int(rank == 0), "environment": environment}
    merged = folder / "runs" / "run" / "version_0" / "merged"
    assert (merged / "model.safetensors").is_file()
    assert [out.count("MergeAdapters: merged model and adapter") for _, out in results] == [1, 0]


#: name -> (how the job starts, strategy overlay, failing global rank, the others wait in a barrier)
FAILURES = {"lightning-ddp-barrier": ("lightning", "ddp", 1, True),
            "torchrun-ddp-collective": ("torchrun", "ddp", 1, False),
            "torchrun-2nodes-ddp-barrier": ("torchrun-2nodes", "ddp", 1, True),
            "lightning-fsdp2-rank0": ("lightning", "fsdp", 0, True)}


@pytest.mark.parametrize("case", FAILURES)
def test_failing_rank_ends_the_job(job, case):
    launcher, strategy, rank, wait = FAILURES[case]
    folder, cli = job({"class_path": "probes.FailOnRank", "init_args": {"rank": rank, "wait": wait}})
    port = free_port()
    if launcher == "lightning":
        commands = [[sys.executable, *cli, *overlay(strategy), "--trainer.devices=2"]]
    elif launcher == "torchrun":
        commands = [[*torchrun(1, 0, 2, port), *cli, *overlay(strategy), "--trainer.devices=2"]]
    else:
        commands = [[*torchrun(2, node, 1, port), *cli, *overlay(strategy), "--trainer.num_nodes=2",
                     "--trainer.devices=1"] for node in (0, 1)]
    results = launch(commands, folder)
    output = "\n".join(out for _, out in results)
    assert all(code != 0 for code, _ in results), [code for code, _ in results]
    assert f"RuntimeError: rank {rank} {ERROR}" in output, output[-4000:]
    if launcher.startswith("torchrun"):
        # the summary of the agent that ran the failing rank names it, with its exception (not "error_file: <N/A>")
        summaries = [out.split("Root Cause (first observed failure):", 1)[-1] for _, out in results]
        assert any(re.search(rf"rank\s*: {rank} \(local_rank: \d\)", summary) and
                   f"RuntimeError: rank {rank} {ERROR}" in summary for summary in summaries), output[-4000:]


@pytest.mark.parametrize("rank", [1, 0])
def test_stalled_rank_ends_the_job(job, rank):
    """A rank that stalls (rather than crashes): the other's barrier times out (the overlay's process-group timeout,
    shortened here), and no process is left running: a stalled child dies with its launcher (PR_SET_PDEATHSIG), a
    stalled launcher is ended by its watchdog when the child fails (``lit_peft.distributed.lifetime``)."""
    folder, cli = job({"class_path": "probes.StallOnRank", "init_args": {"rank": rank}})
    results = launch([[sys.executable, *cli, *overlay("ddp"), "--trainer.devices=2",
                       "--trainer.strategy.init_args.timeout=0:00:15"]], folder)
    code, output = results[0]
    assert code != 0, output[-3000:]
    if rank == 0:
        assert "lit_peft: rank process" in output and "ended with exit code" in output, output[-3000:]


@pytest.mark.parametrize("overlay", sorted(p.name for p in (REPO / "configs" / "strategy").glob("*.yaml")))
def test_slurm_template_srun_line_parses(tmp_path, monkeypatch, overlay):
    template = REPO / "scripts" / "slurm_fit.sbatch"
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", template.read_text(), re.M))
    assert options["ntasks-per-node"] == options["gpus-per-node"], "one task per GPU"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')  # stands in for srun
    (bin_dir / "srun").chmod(0o755)
    env = cli_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SRUN_ARGS=str(tmp_path / "srun-args"),
                  SLURM_NNODES="3", SLURM_NTASKS_PER_NODE="4", SLURM_CPUS_PER_TASK="8", STRATEGY=f"strategy/{overlay}")
    proc = subprocess.run(["bash", str(template), "--trainer.max_epochs=2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=LIMIT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    command = (tmp_path / "srun-args").read_text().splitlines()
    assert command[:4] == ["python", "-m", "lit_peft", "fit"], command
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit_peft"])  # LightningCLI warns when sys.argv and args both carry arguments
    trainer = print_config(*command[4:])["trainer"]
    assert (trainer["num_nodes"], str(trainer["devices"]), trainer["max_epochs"]) == (3, "4", 2)  # devices: int|str
    if trainer["strategy"]["class_path"].endswith("ModelParallelStrategy"):  # FSDP2: one data-parallel group of all
        assert trainer["strategy"]["init_args"]["data_parallel_size"] == 12
