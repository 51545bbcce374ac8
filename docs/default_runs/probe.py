"""Semantic probe of README "The default runs": N generations of a digits run (class i % 10 when the
model is class-conditional, seeds 1000...), scored by evaluate.py's semantic classifier.

    python docs/default_runs/probe.py RUN_DIR 200
"""
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ambient.pipeline import AmbientPipeline
from ambient.data import load_dataset
from ambient.attack.semantic import semantic_quality
from torchvision.utils import save_image

run, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200
extra = dict(a.split("=") for a in sys.argv[3:])
pipe = AmbientPipeline.from_pretrained(f"{run}/model")
labels = torch.arange(n) % 10 if getattr(pipe.unet.config, "num_class_embeds", None) else None
gens = [torch.Generator().manual_seed(1000 + i) for i in range(n)]
kw = {}
if "steps" in extra: kw["num_inference_steps"] = int(extra["steps"])
out = pipe(batch_size=n, generator=gens, class_labels=labels, output_type="pt", **kw)
imgs = out.images if hasattr(out, "images") else out
imgs = imgs.float()
if imgs.min() < 0: imgs = (imgs + 1) / 2
data = load_dataset(OmegaConf.create({"kind": "digits", "resolution": 16, "channels": 1, "limit": None, "holdout": 0, "duplicate": None}))
real = (data.as_float() + 1) / 2 if data.as_float().min() < 0 else data.as_float()
res = semantic_quality(imgs, real, data.labels, 10, labels)
print(json.dumps(res))
save_image(imgs[:100], f"{run}/probe.png", nrow=10)
