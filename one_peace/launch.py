"""``python -m one_peace.launch nodes=N gpus_per_node=G partition=P -- recipe=... output_dir=/shared/run ...``:
a recipe on N nodes through SLURM, with submitit submitting and torchrun running it (no launcher of our own).

Each node runs one submitit task, which starts ``torchrun --nnodes=N --nproc_per_node=G`` with torchrun's c10d
rendezvous on the first node (``--rdzv_endpoint=<first host>:<port>``, the job id as ``--rdzv_id``), so every node
finds the others without a fixed master address. The recipe always runs with ``trainer.resume=true``: a job that
SLURM preempts or times out is requeued by submitit (:meth:`NodeTask.checkpoint`) and continues from its last
complete checkpoint in ``output_dir`` (which must be on a file system every node sees).

``cluster=local`` runs the same tasks as local processes (submitit's local executor: one process per "node", the
rendezvous on 127.0.0.1): what the tests use, and a dry run before a cluster. ``sbatch=PATH`` writes the equivalent
``sbatch`` script instead of submitting (for clusters where jobs are submitted by hand).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLUSTERS = ("slurm", "local")


@dataclass
class LaunchConfig:
    """Submit a recipe to N nodes x G processes (SLURM through submitit, or local processes).

    Attributes:
        nodes: Nodes (one submitit task each; torchrun's ``--nnodes``).
        gpus_per_node: GPUs per node, one training process each (0: CPU training, see ``procs_per_node``).
        procs_per_node: Training processes per node (default: ``gpus_per_node``, or 1 without GPUs).
        cluster: ``slurm`` or ``local`` (every node a local process: tests and dry runs).
        partition: SLURM partition.
        account: SLURM account.
        qos: SLURM quality of service.
        time_min: Time limit of one allocation in minutes (the job is requeued past it and resumes).
        cpus_per_node: CPU cores per node (default: 8 per GPU, or 2).
        mem_gb: Memory per node in GB (0: the partition's default).
        port: The rendezvous port on the first node.
        log_dir: Where submitit writes each task's stdout/stderr and its pickled job.
        name: The job name.
        wait: Wait for the job and print each node's result.
        sbatch: Write an equivalent sbatch script to this path instead of submitting.
        recipe_args: The recipe's ``key=value`` arguments (what follows ``--`` on the command line).
    """

    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int | None = None
    cluster: str = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 24 * 60
    cpus_per_node: int | None = None
    mem_gb: int = 0
    port: int = 29500
    log_dir: str = "launch_logs"
    name: str = "one-peace"
    wait: bool = False
    sbatch: str | None = None
    recipe_args: list[str] = field(default_factory=list)

    def procs(self) -> int:
        """Training processes per node."""
        return self.procs_per_node or self.gpus_per_node or 1

    def check(self) -> None:
        """Refuse impossible values, naming the key."""
        if self.cluster not in CLUSTERS:
            raise ValueError(f"cluster: expected one of {list(CLUSTERS)}, got {self.cluster!r}")
        for key in ("nodes", "time_min", "port"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.procs() < 1 or self.gpus_per_node < 0:
            raise ValueError("gpus_per_node / procs_per_node: must give at least one process per node")
        if not any(a.startswith(("output_dir=", "+output_dir=")) for a in self.recipe_args):
            raise ValueError(
                "recipe arguments: pass output_dir=<a folder every node sees> after '--': requeued jobs resume from it"
            )


def torchrun_command(cfg: LaunchConfig, nnodes: int, master: str, run_id: str) -> list[str]:
    """The torchrun command every node runs (c10d rendezvous on ``master``; the recipe with resume on)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={cfg.procs()}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={master}:{cfg.port}",
        f"--rdzv_id={run_id}",
        "--max_restarts=0",
        "-m",
        "one_peace.run",
        *cfg.recipe_args,
        "trainer.resume=true",
    ]


class NodeTask:
    """What one node runs: torchrun, found through submitit's job environment. Requeued on preemption or timeout
    (:meth:`checkpoint`): the recipe resumes from its last checkpoint."""

    def __init__(self, cfg: LaunchConfig) -> None:
        self.cfg = cfg

    def __call__(self) -> int:
        """Run torchrun on this node; its exit status (a failure raises, so submitit reports it)."""
        import submitit

        env = submitit.JobEnvironment()
        master = "127.0.0.1" if self.cfg.cluster == "local" else env.hostnames[0]
        command = torchrun_command(self.cfg, env.num_tasks, master, str(env.job_id))
        print(f"node {env.global_rank} of {env.num_tasks}: {shlex.join(command)}", flush=True)
        sub_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        for key in [k for k in sub_env if k.startswith(("SUBMITIT_", "SLURM_PROCID"))]:
            sub_env.pop(key)  # torchrun's ranks, not submitit's task id, decide the processes' ranks
        done = subprocess.run(command, env=sub_env)
        if done.returncode != 0:
            raise RuntimeError(f"node {env.global_rank}: torchrun exited with {done.returncode}")
        return done.returncode

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on preemption / timeout: submit this task again (the recipe resumes)."""
        import submitit

        return submitit.helpers.DelayedSubmission(NodeTask(self.cfg))


def executor(cfg: LaunchConfig) -> Any:
    """The submitit executor for ``cfg``: one task per node (locally: one process per node)."""
    import submitit

    folder = Path(cfg.log_dir) / "%j"
    if cfg.cluster == "local":
        ex: Any = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(tasks_per_node=cfg.nodes, nodes=1, timeout_min=cfg.time_min)
        return ex
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params: dict[str, Any] = {
        "nodes": cfg.nodes,
        "tasks_per_node": 1,
        "gpus_per_node": cfg.gpus_per_node,
        "cpus_per_task": cfg.cpus_per_node or (8 * cfg.gpus_per_node or 2),
        "timeout_min": cfg.time_min,
        "name": cfg.name,
        "slurm_signal_delay_s": 120,  # time to write a checkpoint before the allocation ends
    }
    if cfg.mem_gb:
        params["mem_gb"] = cfg.mem_gb
    for key in ("partition", "account", "qos"):
        if getattr(cfg, key):
            params[f"slurm_{key}"] = getattr(cfg, key)
    ex.update_parameters(**params)
    return ex


def sbatch_script(cfg: LaunchConfig) -> str:
    """The equivalent hand-submitted job: ``srun`` starts one torchrun per node with the same rendezvous; resubmit
    it (or let ``--requeue`` do so) and the recipe resumes."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={cfg.name}",
        f"#SBATCH --nodes={cfg.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={cfg.cpus_per_node or (8 * cfg.gpus_per_node or 2)}",
        f"#SBATCH --time={cfg.time_min}",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@120",
        f"#SBATCH --output={cfg.log_dir}/%j_%t.out",
    ]
    if cfg.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={cfg.gpus_per_node}")
    if cfg.mem_gb:
        lines.append(f"#SBATCH --mem={cfg.mem_gb}G")
    for key in ("partition", "account", "qos"):
        if getattr(cfg, key):
            lines.append(f"#SBATCH --{key}={getattr(cfg, key)}")
    command = torchrun_command(cfg, cfg.nodes, "$MASTER", "$SLURM_JOB_ID")
    command[0] = "python"
    lines += [
        "",
        "set -euo pipefail",
        'MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
        "srun " + " ".join(a if a.startswith(("--rdzv_endpoint", "--rdzv_id")) else shlex.quote(a) for a in command),
        "",
    ]
    return "\n".join(lines)


def launch(cfg: LaunchConfig) -> list[Any]:
    """Submit the job (or write its sbatch script); returns submitit's jobs (one per node)."""
    cfg.check()
    if cfg.sbatch:
        Path(cfg.sbatch).write_text(sbatch_script(cfg))
        return []
    from one_peace.extras import require

    require("launch", "submitit", feature="python -m one_peace.launch")
    ex = executor(cfg)
    job = ex.submit(NodeTask(cfg))
    print(f"submitted job {job.job_id}: {cfg.nodes} node(s) x {cfg.procs()} process(es); logs in {cfg.log_dir}")
    if cfg.wait:
        results = job.results()
        print(f"job {job.job_id} finished: {results}")
    return [job]


def main(argv: list[str] | None = None) -> int:
    """``python -m one_peace.launch key=value ... -- recipe arguments``."""
    from one_peace.cli import parse

    args = list(sys.argv[1:] if argv is None else argv)
    ours, recipe = (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else (args, [])
    cfg = parse(LaunchConfig, ours, "python -m one_peace.launch")
    cfg.recipe_args = recipe
    from one_peace.extras import MissingExtraError

    try:
        launch(cfg)
    except (ValueError, RuntimeError, MissingExtraError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
