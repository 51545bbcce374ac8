"""Training-time defenses: what a user turns on to keep training images from being copied.

- corruption.py  Ambient Diffusion's corruption operators A (random/box masks, noise), B, and the
                 corrupted training set the model is allowed to see
- dedup.py       duplicate groups (exact / near) removed before training; `python -m ambient.defenses.dedup`
- neardup.py     the near-duplicate distance and its blocked search
- grouping.py    duplicate groups from pairs without chaining (every member near the kept image)
- calibrate.py   dedup.threshold=auto: the threshold calibrated on the dataset's own images
- nnsearch.py    dedup.search=index: faiss k-nearest candidates, exact distance on those only
- captions.py    caption-side defenses (randomization, embedding noise, empty-caption mix)
- augment.py     augmentations of the observation and its masks together (flip, shift, crop, photometric)
- privacy.py     DP-SGD with Opacus (Poisson batches, per-sample clipping + noise, accountant)
- loss_drop.py   loss-drop: suspiciously low per-sample losses leave the step (Wen et al. 2024)

A new defense is a module here with its config group in conf/, applied by ambient/training.py.
"""
