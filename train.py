"""Train a diffusion model on corrupted (and/or deduplicated) data.

    python train.py                                   # digits, no corruption, a few CPU minutes
    python train.py corruption=mask90                 # ambient training: 90% of pixels erased
    python train.py experiment=smoke corruption=mask90
    python train.py run_dir=outputs/my_run resume=auto    # continue an interrupted run
    python train.py -m corruption=none,mask60,mask90  # a sweep, one run directory each
    python train.py -m hydra/launcher=joblib hydra.launcher.n_jobs=2 corruption=none,mask90
    accelerate launch --multi_gpu --num_processes 4 train.py corruption=mask90   # one run, 4 ranks
    python train.py -m hydra/launcher=slurm_gpu corruption=none,mask90    # SLURM, see README
    python train.py evaluate.after_train=true     # then the extraction attack, into <run_dir>/eval

A job that fails writes failed.json (error, traceback) into its run directory and re-raises:
Hydra still runs the other jobs of a sweep and exits non-zero at the end.
"""
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ambient import (
    launch,  # registers ${run_stamp:} and ${main_rank_only:} (also in sweep workers)
)
from ambient.config import evaluate_config, validate, validate_attack, validate_evaluate
from ambient.errors import ConfigError, Interrupted, RunRefused
from ambient.rundir import RunDir, cli_override


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        validate(cfg)
        if cfg.evaluate.after_train:  # bad evaluate overrides fail now, not after training
            validate_attack(evaluate_config(run_dir, cfg.evaluate.overrides))
        launch.export_distributed_env()  # before the Accelerator exists
        from ambient.training import (
            train,  # after validation: a config error costs no torch import
        )

        cfg.run_dir = str(run_dir)
        summary = train(cfg, run_dir)
        if cfg.evaluate.after_train and "model" in summary:  # main rank; the others are done
            summary["report"] = _evaluate(run_dir, cfg.evaluate.overrides)
    except (Exception, Interrupted) as error:
        if _config_typo(error, hydra_cfg) and RunDir(run_dir).discard_if_only({hydra_cfg.output_subdir, f"{hydra_cfg.job.name}.log"}):
            raise  # a single run that never started leaves no folder behind (a sweep job keeps failed.json)
        # A failure before this launch held the run directory is recorded only in a directory that is
        # not a run yet: never over another run's failed.json.
        owned = getattr(error, "ambient_owned_run", False) or not RunDir(run_dir).is_run()
        failed = RunDir(run_dir).record_failure(error, hydra_cfg.overrides.task) \
            if owned and launch.process_rank() == 0 else None
        if failed is not None:
            print(f"failed:  {failed}", file=sys.stderr)
            if RunDir(run_dir).checkpoints.is_dir():
                kept = [shlex.quote(o) for o in hydra_cfg.overrides.task if not o.startswith(("run_dir=", "resume="))]
                print(f"resume:  python train.py {' '.join(kept)} {cli_override('run_dir', run_dir)} resume=auto",
                      file=sys.stderr)
        raise
    if "model" in summary:
        print(f"model:   {summary['model']}")
        print(f"samples: {summary.get('samples', '(sample.count=0)')}")
        print(f"run dir: {run_dir}")
        print(f"attack:  python evaluate.py {cli_override('run_dir', run_dir)}")
    if "report" in summary:
        print(f"report:  {summary['report']}")


def _config_typo(error, hydra_cfg) -> bool:
    """A bad value in a single run (not a refusal to touch an existing run, not a sweep job)."""
    return (isinstance(error, ConfigError) and not isinstance(error, RunRefused)
            and hydra_cfg.mode == RunMode.RUN)


def _evaluate(run_dir: Path, overrides) -> Path:
    from ambient.evaluation import evaluate_run

    eval_cfg = evaluate_config(run_dir, overrides)
    validate_evaluate(eval_cfg)
    return evaluate_run(run_dir, eval_cfg, Path(eval_cfg.out_dir))


if __name__ == "__main__":
    main()
