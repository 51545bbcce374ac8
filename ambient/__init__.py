"""ambient: train diffusion models on corrupted data and measure what they memorize."""
