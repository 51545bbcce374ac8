"""ambient: train diffusion models on corrupted data and measure what they memorize."""
from ambient.launch import register_resolvers

register_resolvers()  # ${run_stamp:}, ${main_rank_only:...} in conf/train.yaml


def __getattr__(name):
    # `from ambient import AmbientPipeline` without importing torch/diffusers on `import ambient`
    if name == "AmbientPipeline":
        from ambient.pipeline import AmbientPipeline

        return AmbientPipeline
    raise AttributeError(f"module 'ambient' has no attribute {name!r}")
