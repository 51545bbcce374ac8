"""Launching: run stamps every process of a launch agrees on, ranks, and distributed environments.

Hydra resolves `${now:}` in each process it starts, so under `accelerate launch` every rank
made its own run directory. `${run_stamp:}` (used by conf/train.yaml for `run_dir` and
`hydra.sweep.dir`) is the same in every process of one launch and different for any two
launches, even in the same second:

    under SLURM, one srun step of several tasks   slurm-<job>[_<array task>].<step>
    under SLURM otherwise                         slurm-<job>[_<array task>]/<local stamp>
    torchrun / accelerate launch, WORLD_SIZE > 1  <date>/<time>-pid<launcher pid>  (the launcher
                                                  is every rank's parent: its pid and start time)
    a single process                              <date>/<time>-<microseconds>

`${main_rank_only:value[,otherwise]}` is `value` on the main rank and `otherwise` (null) on the
others: Hydra's own `.hydra/` record and log file are written by the main rank only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from omegaconf import OmegaConf

from ambient.rundir import eval_dir, hydra_record_dir


def _slurm_job() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def _elastic_launch() -> bool:
    """Started by torchrun / `accelerate launch` (torch elastic) as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ


def run_stamp() -> str:
    """A directory stamp shared by all processes of one launch, unique across launches."""
    job = _slurm_job()
    if job and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        # Tasks of one srun step (submitit's tasks_per_node) share no parent; they share the step.
        return f"slurm-{job}.{os.environ.get('SLURM_STEP_ID', '0')}"
    if _elastic_launch():
        import psutil

        launcher = psutil.Process(os.getppid())  # torch elastic's agent: the parent of every local rank
        started = datetime.fromtimestamp(launcher.create_time())
        local = f"{started:%Y-%m-%d/%H-%M-%S}-pid{launcher.pid}"
    else:
        local = f"{datetime.now():%Y-%m-%d/%H-%M-%S-%f}"
    return f"slurm-{job}/{local}" if job else local


def process_rank() -> int:
    """Global rank of this process: torch's RANK, else the submitit task, else 0."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if os.environ.get("SUBMITIT_EXECUTOR"):  # before export_distributed_env() ran
        import submitit

        return int(submitit.JobEnvironment().global_rank)
    return 0


def main_rank_only(value, otherwise=None):
    return value if process_rank() == 0 else otherwise


def register_resolvers() -> None:
    """Idempotent; ambient/__init__.py calls it, so any `import ambient...` can compose conf/."""
    if not OmegaConf.has_resolver("run_stamp"):
        # Cached like `now`: one value per config, and Hydra copies the cache into sweep jobs.
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
    if not OmegaConf.has_resolver("main_rank_only"):
        OmegaConf.register_new_resolver("main_rank_only", main_rank_only)
    if not OmegaConf.has_resolver("hydra_record"):
        # Cached: Hydra reads output_subdir several times while it writes the record.
        OmegaConf.register_new_resolver("hydra_record", hydra_record_dir, use_cache=True)
    if not OmegaConf.has_resolver("eval_dir"):
        # Cached, and stamped like runs: every rank of a sharded evaluation writes into one folder.
        OmegaConf.register_new_resolver("eval_dir", lambda run_dir, checkpoint=None: eval_dir(run_dir, run_stamp(), checkpoint),
                                        use_cache=True)


def export_distributed_env() -> dict:
    """Before the Accelerator is built: make the processes of a multi-task job one process group.

    - submitit task of a job with several tasks (the SLURM strategy: tasks_per_node = GPUs per
      node): export MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE. Every task
      keeps all GPUs of its node visible; accelerate picks cuda:LOCAL_RANK.
    - several processes but no CUDA: ACCELERATE_USE_CPU=true, without which accelerate leaves each
      process alone (DistributedType.NO) instead of joining a gloo group.
    Returns the variables it set; outside these cases it changes nothing.
    """
    before = dict(os.environ)
    if os.environ.get("SUBMITIT_EXECUTOR") and "RANK" not in os.environ:
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return {k: v for k, v in os.environ.items() if before.get(k) != v}


@dataclass
class Shard:
    """This process's part of a multi-process evaluation: rank `rank` of `world` does every
    world-th unit of work; `barrier` waits for all ranks; `device` is the rank's own (None: choose)."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = field(default=lambda: None)
    device: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()  # else the gloo/NCCL group aborts the process at exit


def evaluation_shard() -> Shard:
    """The ranks of `accelerate launch` / torchrun / a multi-task SLURM job running evaluate.py
    together (gloo on CPUs, NCCL on GPUs), or this one process alone."""
    export_distributed_env()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard()
    import torch
    from accelerate import PartialState

    # cpu=True is what joins CPU processes into one gloo group (the Accelerator reads
    # ACCELERATE_USE_CPU itself; PartialState does not).
    state = PartialState(cpu=not torch.cuda.is_available())
    return Shard(state.process_index, state.num_processes, state.wait_for_everyone, str(state.device))

