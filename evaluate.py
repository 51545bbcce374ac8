"""Run the training-data extraction attack (Carlini et al. 2023) and report memorization and quality.

    python evaluate.py run_dir=outputs/train/DATE/TIME            # a run made by train.py
    python evaluate.py run_dir=... attack.samples_per_prompt=500
    python evaluate.py -m run_dir=... checkpoint=1000,2000,3000  # earlier checkpoints (memorization vs steps)
    python evaluate.py model=DIR train_data=DIR reference_data=DIR  # any diffusers model
    python evaluate.py samples=DIR train_data=DIR                 # any model's generations
"""
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import ambient  # noqa: F401  registers ${eval_dir:} (ambient/launch.py)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from ambient.config import validate_evaluate

    validate_evaluate(cfg)
    from ambient.evaluation import evaluate_folders, evaluate_model, evaluate_run
    from ambient.launch import evaluation_shard

    out = Path(HydraConfig.get().runtime.output_dir)
    if cfg.run_dir and cfg.get("checkpoint") is not None:
        out = Path(cfg.out_dir)  # also under -m (checkpoint=1000,2000,...): beside the run, where trajectory looks
    shard = evaluation_shard()  # `accelerate launch --num_processes N evaluate.py ...` shares the generation
    try:
        if cfg.run_dir:
            report = evaluate_run(Path(cfg.run_dir), cfg, out, shard)
        elif cfg.model_path:
            report = evaluate_model(Path(cfg.model_path), Path(cfg.train_data), cfg, out, shard)
        else:
            report = evaluate_folders(Path(cfg.samples), Path(cfg.train_data), cfg, out) if shard.main else None
    finally:
        shard.close()
    if report is None:
        return  # another rank reports
    print(f"report:  {report}")
    print(f"summary: {report.with_suffix('.md')}")


def model_alias(argv: list[str]) -> list[str]:
    """`model` is train.py's config group in the shared conf/, so Hydra cannot take model=DIR here;
    the documented spelling is rewritten to the key it means."""
    return [f"model_path={a[len('model='):]}" if a.startswith("model=") else a for a in argv]


if __name__ == "__main__":
    sys.argv[1:] = model_alias(sys.argv[1:])
    main()
