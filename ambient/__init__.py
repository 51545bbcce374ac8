"""ambient: train diffusion models on corrupted data and measure what they memorize."""
from ambient.launch import register_resolvers

register_resolvers()  # ${run_stamp:}, ${main_rank_only:...} in conf/train.yaml
