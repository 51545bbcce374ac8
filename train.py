"""Train a diffusion model on corrupted (and/or deduplicated) data.

    python train.py                                   # digits, no corruption, a few CPU minutes
    python train.py corruption=mask90                 # ambient training: 90% of pixels erased
    python train.py experiment=smoke corruption=mask90
    python train.py run_dir=outputs/my_run resume=auto    # continue an interrupted run
    python train.py -m corruption=none,mask60,mask90  # a sweep, one run directory each
"""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ambient.config import validate


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    validate(cfg)
    from pathlib import Path

    from ambient.training import train  # after validation: a config error costs no torch import

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    cfg.run_dir = str(run_dir)
    summary = train(cfg, run_dir)
    if "model" in summary:
        print(f"model:   {summary['model']}")
        print(f"samples: {summary.get('samples', '(sample.count=0)')}")
        print(f"run dir: {run_dir}")


if __name__ == "__main__":
    main()
