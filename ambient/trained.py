"""The trained-model artifact under its earlier name: `TrainedModel` is `AmbientPipeline`."""
from ambient.pipeline import (
    AmbientPipeline,
    linear_vp_alpha_bar,
    load_run,
    save_trained,
)

TrainedModel = AmbientPipeline

__all__ = ["TrainedModel", "AmbientPipeline", "linear_vp_alpha_bar", "load_run", "save_trained"]
