"""#27: multi-node training through submitit + torchrun's c10d rendezvous, simulated on one machine: two "nodes"
(submitit's local executor, one process per node, each running ``torchrun --nnodes=2``) train a recipe to the
losses of one process with the same global batch, and a job killed mid-run resumes from its last checkpoint. These are
torchrun launches beyond the default run's one, so they are ``slow``; the sbatch script and the argument checks are
not."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from one_peace.launch import LaunchConfig, launch, main, sbatch_script

COMMON = [
    "recipe=vl_contrastive",
    "data.demo_train=32",
    "data.demo_valid=16",
    "data.image_size=32",
    "data.vocab_size=300",
    "data.shuffle_window=0",
    "model.layer_scale_init=0.1",
    "trainer.log_every=1",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _single(out: Path, *extra: str) -> list[float]:
    from one_peace.run import run

    with initialize_config_module(config_module="one_peace.recipes", version_base=None):
        run(compose(config_name="config", overrides=[*COMMON, f"output_dir={out}", *extra]))
    return _losses(out)


@pytest.mark.slow
def test_two_local_nodes_train_to_the_single_process_losses_and_a_killed_job_resumes(tmp_path):
    two = tmp_path / "two"
    steps = ["trainer.max_steps=4", "trainer.save_every=2"]
    cfg = LaunchConfig(
        nodes=2,
        cluster="local",
        port=_port(),
        log_dir=str(tmp_path / "logs"),
        recipe_args=[*COMMON, *steps, "trainer.batch_size=4", f"output_dir={two}"],
    )
    (job,) = launch(cfg)
    job.results()  # raises when a node failed
    ref = _single(tmp_path / "single", *steps, "trainer.batch_size=8")
    got = _losses(two)
    assert len(got) == len(ref) == 4 and all(abs(a - b) < 1e-5 for a, b in zip(got, ref)), (got, ref)

    # one node killed after the step-2 checkpoint: the job fails; submitted again (as the requeue does), it resumes
    killed = tmp_path / "killed"
    args = [a for a in cfg.recipe_args if not a.startswith(("trainer.max_steps", "output_dir"))]
    first = LaunchConfig(
        **{**cfg.__dict__, "port": _port(), "recipe_args": [*args, "trainer.max_steps=8", f"output_dir={killed}"]}
    )
    (job,) = launch(first)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_0000002" / "COMPLETE").is_file():
        assert time.time() < deadline and not job.done(), "the job ended before its first checkpoint"
        time.sleep(0.02)
    victims = _torchrun_pids(first.port)
    assert len(victims) == 2, victims  # one torchrun per "node"
    for pid in _tree(victims[-1]):  # the node dies: its torchrun agent and its training process
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(Exception):  # noqa: B017 - submitit wraps the node's failure
        job.results()
    assert not (killed / "checkpoints" / "step_0000008").exists()
    again = LaunchConfig(**{**first.__dict__, "port": _port()})
    launch(again)[0].results()
    lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    full = _single(tmp_path / "single8", "trainer.max_steps=8", "trainer.save_every=2", "trainer.batch_size=8")
    assert all(abs(x["loss"] - b) < 1e-5 for x, b in zip(lines, full)), (lines, full)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        kids = []
    return [pid] + [p for k in kids for p in _tree(k)]


def _torchrun_pids(port: int) -> list[int]:
    """The torchrun agents (not their workers) of the launch on ``port``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"torch.distributed.run" in cmd and f"--rdzv_endpoint=127.0.0.1:{port}".encode() in cmd:
            found.append(int(proc.name))
    return sorted(found)


def test_the_sbatch_script_and_the_arguments(tmp_path, capsys):
    cfg = LaunchConfig(
        nodes=4, gpus_per_node=8, partition="gpu", time_min=600, recipe_args=["recipe=pretrain_vl", "output_dir=/s/r"]
    )
    script = sbatch_script(cfg)
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script and "#SBATCH --requeue" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$MASTER:29500" in srun
    assert srun.endswith("recipe=pretrain_vl output_dir=/s/r trainer.resume=true")
    written = tmp_path / "job.sbatch"
    assert main(["nodes=4", "gpus_per_node=8", f"sbatch={written}", "--", "recipe=pretrain_vl", "output_dir=/s/r"]) == 0
    assert written.read_text() == script.replace("#SBATCH --partition=gpu\n", "").replace("--time=600", "--time=1440")
    with pytest.raises(SystemExit, match="output_dir=<a folder every node sees>"):
        main(["nodes=2", "--", "recipe=vl_contrastive"])
    with pytest.raises(SystemExit, match="cluster: expected one of"):
        main(["cluster=kubernetes", "--", "output_dir=x"])
