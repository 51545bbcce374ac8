"""Every option's allowed values, and start-of-run validation that names the bad key and its range.

Torch-free on purpose: a config error costs no torch import. Builders import the tuples below, so
an option is declared once; conf/<group>/*.yaml pick among them with a `kind` key.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ambient import rundir
from ambient.errors import ConfigError, RunRefused  # noqa: F401  (re-exported: ambient.config.ConfigError)

DATASET_KINDS = ("digits", "fashion_mnist", "imagefolder", "torchvision", "hf")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CHANNELS = (1, 3)
CORRUPTION_KINDS = ("none", "mask", "box", "box_official", "noise")
MASK_KEYS = ("index", "content")  # what fixes an image's masks: its position, or its pixels
MODEL_KINDS = ("unet", "pretrained", "unet_text", "pipeline", "latent_pipeline")
TEXT_MODEL_KINDS = ("unet_text", "pipeline", "latent_pipeline")
PIPELINE_KINDS = ("pipeline", "latent_pipeline")  # fine-tunes of a diffusers text-to-image pipeline's UNet
LATENT_PIPELINE_PARTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
LATENT_CORRUPTIONS = ("none", "noise")  # pixel masks do not carry over to a VAE's latents
FINETUNE_KINDS = ("full", "lora")  # model.finetune of a latent pipeline
LOSS_KINDS = ("edm", "ddpm")
PREDICTION_TYPES = ("epsilon", "sample")
NOISY_OBJECTIVES = ("ambient", "naive")  # corruption=noise: Tweedie-matched loss at σ_t ≥ σ_n, or the ordinary loss on y
BELOW_SIGMA_N = ("stop", "continue")  # sampling a loss.noisy=ambient model: end at σ_n with D, or go on below it
HIDDEN_PRECOND = ("official", "sigma_data")  # EDM output on pixels the mask hides (README, differences)
SAMPLER_KINDS = ("edm_heun", "ddim", "ddpm_ancestral")
SAMPLER_OF_LOSS = {"edm": "edm_heun", "ddpm": "ddim"}  # the default: conf/train.yaml picks sampler=${loss}
SAMPLERS_OF_LOSS = {"edm": ("edm_heun",), "ddpm": ("ddim", "ddpm_ancestral")}
HIDDEN_READOUTS = ("x0", "epsilon")  # how a DDPM model's output is read on pixels its mask hides
DEDUP_KINDS = ("none", "exact", "near")
DEDUP_METRICS = ("tiled", "l2")
DEDUP_GROUPINGS = ("kept", "pairwise", "connected")  # ambient/defenses/grouping.py
DEDUP_SEARCH = ("auto", "exact", "index")  # all pairs (bounded), or a nearest-neighbour index
DEDUP_INDEXES = ("auto", "hnsw", "flat", "gpu")  # faiss index of dedup.search=index (flat: exact, no faiss needed;
#                                                  gpu: exact on the GPU, faiss-gpu; auto: gpu where it can, else hnsw)
TEXT_ENCODER_KINDS = ("none", "minilm", "pretrained")
CAPTION_RANDOMIZE = ("none", "replace", "add", "shuffle")
LOGGER_KINDS = ("none", "wandb")
LOGGER_MODES = ("offline", "online", "disabled")
MIXED_PRECISION = ("no", "fp16", "bf16")
FUSED_LOSS = ("auto", "on", "off")
RESUME = ("never", "auto")
PRIVACY_KINDS = ("none", "dpsgd")
ACCOUNTANTS = ("rdp", "prv")  # Opacus' accountants
INPAINT_REGIONS = ("left", "right", "top", "bottom", "center", "random")
MIA_ATTACKS = ("loss", "loss_multi_t", "secmi", "pia")
DUPLICATE_KINDS = ("copy", "canary")  # dataset.duplicate: planted copies of real images, or synthetic canaries  # membership inference attacks (mia.attacks)
ATTACK_FEATURES = ("efficientnet_lite0", "random_projection", "pixels")
DEVICES = ("auto", "cpu", "cuda")  # or cuda:N
MIN_RESOLUTION = 8  # evaluate.py's folder mode compares images at no less than this


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


def _in(cfg: DictConfig, key: str, choices) -> None:
    value = OmegaConf.select(cfg, key)
    _check(value in choices, key, value, " | ".join(map(str, choices)))


def _number(cfg: DictConfig, key: str, low=None, high=None, high_open=False, integer=False) -> None:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (low is None or value >= low) and (high is None or (value < high if high_open else value <= high))
    bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{')' if high_open else ']'}"
    _check(ok, key, value, ("an integer in " if integer else "a number in ") + bounds)


def validate_dataset(cfg: DictConfig) -> None:
    d = cfg.dataset
    _in(cfg, "dataset.kind", DATASET_KINDS)
    _number(cfg, "dataset.resolution", low=1, integer=True)
    _in(cfg, "dataset.channels", CHANNELS)
    if d.get("limit") is not None:
        _number(cfg, "dataset.limit", low=1, integer=True)
    holdout = d.get("holdout", 0)
    if isinstance(holdout, float) and holdout < 1:
        _number(cfg, "dataset.holdout", low=0, high=1, high_open=True)
    else:
        _number(cfg, "dataset.holdout", low=0, integer=True)
    if d.kind == "imagefolder":
        _check(Path(str(d.path)).expanduser().is_dir(), "dataset.path", d.path, "an existing directory of images")
    if d.kind == "fashion_mnist":
        _in(cfg, "dataset.split", ("train", "test"))
    if d.get("duplicate") is not None:  # planted copies (dedup experiments) or canaries (ambient/canaries.py)
        dup = d.duplicate
        _check(OmegaConf.is_dict(dup) and set(dup) <= {"kind", "count", "times", "seed", "references"}
               and "count" in dup and "times" in dup, "dataset.duplicate", dup,
               "null, {count: k, times: m, seed: s} or {kind: canary, count: k, times: [m, ...], seed: s, references: r}")
        if "kind" in dup:
            _in(cfg, "dataset.duplicate.kind", DUPLICATE_KINDS)
        _number(cfg, "dataset.duplicate.count", low=1, integer=True)
        if dup.get("kind", "copy") == "canary":
            times = dup.times
            ok = (isinstance(times, int) and not isinstance(times, bool) and times >= 1) or (
                OmegaConf.is_list(times) and len(times) > 0
                and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in times))
            _check(ok, "dataset.duplicate.times", times if not OmegaConf.is_list(times) else list(times),
                   "an integer >= 1 or a non-empty list of them (each canary is planted m times)")
            if dup.get("references") is not None:
                _number(cfg, "dataset.duplicate.references", low=1, integer=True)
        else:
            _check("references" not in dup, "dataset.duplicate.references", dup.get("references"),
                   "absent unless dataset.duplicate.kind=canary")
            _number(cfg, "dataset.duplicate.times", low=2, integer=True)
        if dup.get("seed") is not None:
            _number(cfg, "dataset.duplicate.seed", low=0, integer=True)


def validate_dedup(cfg: DictConfig) -> None:
    """The `dedup` group (conf/dedup/*.yaml): kind and, for near, its metric settings."""
    _in(cfg, "dedup.kind", DEDUP_KINDS)
    if cfg.dedup.kind != "near":
        return
    _in(cfg, "dedup.metric", DEDUP_METRICS)
    t = cfg.dedup.get("threshold")
    _check(t == "auto" or (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1),
           "dedup.threshold", t, "auto (calibrated on the dataset) | a number in [0, 1]")
    _in(cfg, "dedup.grouping", DEDUP_GROUPINGS)
    if t == "auto":
        _number(cfg, "dedup.calibration.sample", low=10, integer=True)
        _number(cfg, "dedup.calibration.recall", low=0, high=1)
        _number(cfg, "dedup.calibration.max_false_rate", low=0, high=1, high_open=True)
        _number(cfg, "dedup.calibration.seed", low=0, integer=True)
    _number(cfg, "dedup.max_shift", low=0, high=4, integer=True)
    _number(cfg, "dedup.blur", low=1, high=7, integer=True)
    _check(cfg.dedup.blur % 2 == 1, "dedup.blur", cfg.dedup.blur, "an odd integer (1 = no blur)")
    if cfg.dedup.get("lowpass") is not None:
        _number(cfg, "dedup.lowpass", low=0, high=8)
    if cfg.dedup.get("resample") is not None:
        _number(cfg, "dedup.resample", low=0, high=4)
    _number(cfg, "dedup.resolution", low=8, integer=True)
    _number(cfg, "dedup.block_size", low=1, integer=True)
    _in(cfg, "dedup.search", DEDUP_SEARCH)
    _in(cfg, "dedup.index", DEDUP_INDEXES)
    _number(cfg, "dedup.neighbours", low=1, integer=True)
    _number(cfg, "dedup.index_above", low=0, integer=True)


def validate_corruption(cfg: DictConfig, resolution: int) -> None:
    c = cfg.corruption
    _in(cfg, "corruption.kind", CORRUPTION_KINDS)
    _number(cfg, "corruption.delta", low=0, high=1, high_open=True)
    if c.kind == "none":
        _check(c.delta == 0, "corruption.delta", c.delta, "0 with corruption=none (nothing is observed partially)")
    if c.kind == "mask":
        _number(cfg, "corruption.p", low=0, high=1, high_open=True)
    if c.kind == "box":
        _number(cfg, "corruption.size", low=1, high=resolution - 1, integer=True)
    if c.kind == "box_official":
        _number(cfg, "corruption.p", low=0, high=1, high_open=True)
    if "mask_key" in c:
        _in(cfg, "corruption.mask_key", MASK_KEYS)
    if c.kind == "noise":
        sigma = c.sigma
        _check(isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma > 0, "corruption.sigma",
               sigma, "a number > 0 (the observations' noise σ_n; corruption=none for clean data)")


def noisy_ambient(cfg: DictConfig) -> bool:
    """Whether the run trains with the noisy-data ambient loss (corruption=noise, loss.noisy=ambient; EDM or DDPM
    form by loss.kind). Configs without the key (saved before it existed) trained naive."""
    return cfg.corruption.kind == "noise" and cfg.loss.get("noisy", "naive") == "ambient"


def validate_noisy(cfg: DictConfig) -> None:
    """loss.noisy and loss.consistency_weight (conf/loss/edm.yaml), and what the ambient noisy loss needs."""
    if "noisy" in cfg.loss:
        _in(cfg, "loss.noisy", NOISY_OBJECTIVES)
    if "consistency_weight" in cfg.loss:
        _number(cfg, "loss.consistency_weight", low=0)
        _check(cfg.loss.consistency_weight == 0 or cfg.loss.kind == "edm", "loss.consistency_weight",
               cfg.loss.consistency_weight, "0 with loss=ddpm: the consistency loss is implemented for loss=edm only")
        _check(cfg.loss.consistency_weight == 0 or noisy_ambient(cfg), "loss.consistency_weight",
               cfg.loss.consistency_weight, "0 unless corruption=noise and loss.noisy=ambient (it trains below σ_n)")
    if not noisy_ambient(cfg):
        return
    _check(cfg.corruption.delta == 0, "corruption.delta", cfg.corruption.delta,
           "0 with loss.noisy=ambient (the noisy-data loss observes every pixel)")
    if "sigma_max" in cfg.sampler:
        _check(cfg.sampler.sigma_max > cfg.corruption.sigma, "sampler.sigma_max", cfg.sampler.sigma_max,
               f"a number > corruption.sigma={cfg.corruption.sigma} (sampling starts above the data's noise)")


def check_latent_pipeline(path) -> Path:
    """A Stable-Diffusion-style pipeline folder (vae/, unet/, text_encoder/, tokenizer/, scheduler/), or a
    ConfigError naming model.path and what is missing. Reads no weights."""
    folder = Path(str(path)).expanduser()
    parts = ", ".join(p + "/" for p in LATENT_PIPELINE_PARTS)
    _check(folder.is_dir(), "model.path", str(path), f"an existing diffusers pipeline folder with {parts}")
    missing = [p + "/" for p in LATENT_PIPELINE_PARTS if not (folder / p).is_dir()]
    missing += [n for n in ("model_index.json", "vae/config.json", "unet/config.json")
                if not (folder / n).is_file() and n.split("/")[0] + "/" not in missing]
    _check(not missing, "model.path", str(path),
           f"a latent diffusion pipeline folder with {parts} (a VAE is required); it has no {', '.join(missing)}")
    return folder


def vae_factor(path) -> int:
    """How much a pipeline's VAE downsamples: 2^(encoder blocks − 1) (8 for Stable Diffusion)."""
    import json

    config = json.loads((Path(str(path)).expanduser() / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def validate_latent_pipeline(cfg: DictConfig) -> None:
    """model=latent_pipeline: the folder, a resolution its VAE divides, and a corruption that means
    something in latent space (corruption.sigma is then in latent units)."""
    check_latent_pipeline(cfg.model.path)
    factor = vae_factor(cfg.model.path)
    _check(cfg.dataset.resolution % factor == 0, "dataset.resolution", cfg.dataset.resolution,
           f"a multiple of {factor}, the downsampling factor of the VAE at model.path={cfg.model.path}")
    _check(cfg.corruption.kind in LATENT_CORRUPTIONS, "corruption", cfg.corruption.kind,
           f"{' | '.join(LATENT_CORRUPTIONS)} with model=latent_pipeline (pixel masks do not carry over to latents)")
    if "finetune" in cfg.model:
        _in(cfg, "model.finetune", FINETUNE_KINDS)
    if cfg.model.get("finetune") == "lora":
        import importlib.util

        _number(cfg, "model.lora.rank", low=1, integer=True)
        _number(cfg, "model.lora.alpha", low=0)
        _check(importlib.util.find_spec("peft") is not None, "model.finetune", "lora",
               "full, or install peft for lora (pip install peft, or the project's `lora` extra)")


def validate_text(cfg: DictConfig) -> None:
    """text_encoder, captions and the model kind agree: text models need an encoder and vice versa."""
    if "text_encoder" not in cfg:
        return
    _in(cfg, "text_encoder.kind", TEXT_ENCODER_KINDS)
    text = cfg.text_encoder.kind != "none"
    text_models = TEXT_MODEL_KINDS
    if text:
        _check(cfg.model.kind in text_models, "model", cfg.model.get("name", cfg.model.kind),
               f"a text-conditional model (model=unet_text_tiny or model=pipeline) with text_encoder={cfg.text_encoder.kind}")
        _number(cfg, "text_encoder.max_length", low=1, integer=True)
        _check(cfg.model.get("conditional", False) in (False, "auto"), "model.conditional", cfg.model.get("conditional"),
               "false with a text encoder (captions condition the model, not class labels)")
    else:
        _check(cfg.model.kind not in text_models, "text_encoder", "none",
               f"minilm | clip for model={cfg.model.get('name', cfg.model.kind)} (it cross-attends to captions)")
    if text and "captions" in cfg:
        _in(cfg, "captions.randomize", CAPTION_RANDOMIZE)
        _number(cfg, "captions.q", low=0, high=1)
        _number(cfg, "captions.empty_prob", low=0, high=1, high_open=True)
        _number(cfg, "captions.embedding_noise", low=0)
    if text and "sample" in cfg:
        _number(cfg, "sample.cfg_scale", low=0)


def validate_train(cfg: DictConfig) -> None:
    for key in ("steps", "batch_size", "grad_accum"):
        _number(cfg, f"train.{key}", low=1, integer=True)
    for key in ("checkpoint_every", "log_every", "lr_warmup_steps"):
        _number(cfg, f"train.{key}", low=0, integer=True)
    _number(cfg, "train.checkpoints_keep", low=1, integer=True)
    _number(cfg, "train.lr", low=0)
    _number(cfg, "train.ema_decay", low=0, high=1, high_open=True)
    _number(cfg, "train.augment.hflip", low=0, high=1)
    _number(cfg, "train.augment.max_shift", low=0, high=cfg.dataset.resolution - 1, integer=True)
    for key, high in (("brightness", 2), ("contrast", 1), ("noise", None)):
        if cfg.train.augment.get(key) is not None:
            _number(cfg, f"train.augment.{key}", low=0, high=high)
    if cfg.train.augment.get("crop") is not None:
        _number(cfg, "train.augment.crop", low=0, high=1, high_open=True)
    _in(cfg, "train.mixed_precision", MIXED_PRECISION)
    _in(cfg, "train.fused_loss", FUSED_LOSS)
    if cfg.train.get("loss_drop") is not None:
        _number(cfg, "train.loss_drop.quantile", low=0, high=1, high_open=True)
        for key in ("window", "bins", "min_count"):
            _number(cfg, f"train.loss_drop.{key}", low=1, integer=True)
        _number(cfg, "train.loss_drop.warmup", low=0, integer=True)


def validate_privacy(cfg: DictConfig) -> None:
    """The `privacy` group (conf/privacy/*.yaml): DP-SGD's target or noise, and what it cannot run with."""
    _in(cfg, "privacy.kind", PRIVACY_KINDS)
    if cfg.privacy.kind == "none":
        return
    p = cfg.privacy
    target, sigma = p.get("epsilon"), p.get("noise_multiplier")
    _check((target is None) != (sigma is None), "privacy.epsilon", target,
           "a target ε > 0 with privacy.noise_multiplier=null, or null with a given privacy.noise_multiplier")
    if target is not None:
        _check(isinstance(target, (int, float)) and not isinstance(target, bool) and target > 0, "privacy.epsilon",
               target, "a number > 0 (the target ε), or null with privacy.noise_multiplier")
    else:
        _number(cfg, "privacy.noise_multiplier", low=0)
    delta = p.get("delta")
    _check(isinstance(delta, (int, float)) and not isinstance(delta, bool) and 0 < delta < 1, "privacy.delta", delta,
           "a number in (0, 1), customarily below 1 / the number of training images")
    clip = p.get("max_grad_norm")
    _check(isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0, "privacy.max_grad_norm", clip,
           "a number > 0 (each image's gradient is clipped to this norm)")
    _in(cfg, "privacy.accountant", ACCOUNTANTS)
    _number(cfg, "privacy.noise_multiplicity", low=1, integer=True)
    _check(cfg.train.grad_accum == 1, "train.grad_accum", cfg.train.grad_accum,
           "1 with privacy=dpsgd (one Poisson batch per step; raise train.batch_size instead)")
    _check(cfg.train.mixed_precision != "fp16", "train.mixed_precision", cfg.train.mixed_precision,
           "no | bf16 with privacy=dpsgd (fp16's loss scaling would clip scaled per-sample gradients)")
    drop = cfg.train.get("loss_drop")
    _check(not drop or not drop.get("quantile"), "train.loss_drop.quantile", drop.get("quantile") if drop else None,
           "0 with privacy=dpsgd (dropping by a quantile of other images' losses voids the per-image bound)")


def validate_sampler(cfg: DictConfig) -> None:
    """The `sampler` group: the sampler of the loss's noise process, and its settings."""
    _in(cfg, "sampler.kind", SAMPLER_KINDS)
    wanted = SAMPLERS_OF_LOSS[cfg.loss.kind]
    _check(cfg.sampler.kind in wanted, "sampler.kind", cfg.sampler.kind,
           f"{' | '.join(wanted)} with loss={cfg.loss.kind} (sampler={cfg.loss.kind} is the default)")
    if cfg.sampler.kind == "ddpm_ancestral":
        _in(cfg, "sampler.threshold", ("dynamic", "clip", "none"))
    if "hidden_readout" in cfg.sampler:
        _in(cfg, "sampler.hidden_readout", HIDDEN_READOUTS)
    if "below_sigma_n" in cfg.sampler:
        _in(cfg, "sampler.below_sigma_n", BELOW_SIGMA_N)
    _number(cfg, "sampler.num_steps", low=2, integer=True)
    _in(cfg, "sampler.clip_denoised", (True, False))
    if cfg.sampler.kind == "edm_heun":
        _number(cfg, "sampler.sigma_min", low=0)
        _number(cfg, "sampler.sigma_max", low=float(cfg.sampler.sigma_min))
        _number(cfg, "sampler.rho", low=0)


def validate_logger(cfg: DictConfig) -> None:
    _in(cfg, "logger.kind", LOGGER_KINDS)
    if cfg.logger.kind == "wandb":
        _in(cfg, "logger.mode", LOGGER_MODES)


# Keys a resumed run may change: they do not change what is trained (where it is written, logging,
# the attack after training, checkpoint cadence, the final grid) — or extend it (train.steps).
# The dataset's location may move too (node-local copies): images.json checks the images themselves.
RESUME_MAY_DIFFER = ("run_dir", "output_root", "resume", "logger", "evaluate", "sample", "train.steps",
                     "train.checkpoint_every", "train.checkpoints_keep", "train.log_every", "dataset.path",
                     "dataset.root", "dataset.download")


# Keys added after runs were saved without them, with the value that means what those runs did: a
# saved config lacking one is read with this value, so a run trained before the key existed resumes.
ADDED_KEYS = {"privacy.kind": "none", "train.augment.brightness": 0.0, "train.augment.contrast": 0.0,
              "train.augment.noise": 0.0, "train.augment.crop": 0.0, "train.loss_drop.quantile": 0.0,
              "train.loss_drop.window": 256, "train.loss_drop.bins": 8, "train.loss_drop.warmup": 100,
              "train.loss_drop.min_count": 32}


def _flat(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


INERT = object()  # a key that changes nothing for the run it is missing from


def _added_later(key: str, saved: dict):
    """For keys added after runs were saved: the value that reproduces such a run (INERT: any value does;
    None: not an added key). Noisy observations were trained naively before loss.noisy existed, and the
    key does nothing without corruption=noise; no consistency loss; samplers ran to their sigma_min / t = 0,
    which is what `stop` does for every model without noisy settings."""
    if key == "loss.noisy":
        return "naive" if saved.get("corruption.kind") == "noise" else INERT
    return {"loss.consistency_weight": 0.0, "sampler.below_sigma_n": "stop"}.get(key)


def config_differences(saved: dict, now: dict, may_differ=RESUME_MAY_DIFFER) -> list[str]:
    """`key: saved -> now` for every training-relevant key whose value differs between two resolved
    configs (plain dicts), sorted; keys under `may_differ` are ignored, and so are keys added since the
    saved run when their value now is the one that reproduces it (ADDED_KEYS, `_added_later`)."""
    a, b = {**ADDED_KEYS, **_flat(saved)}, _flat(now)
    free = lambda key: any(key == k or key.startswith(k + ".") for k in may_differ)

    def same(k) -> bool:
        if k not in a and k in b and _added_later(k, a) is not None:
            legacy = _added_later(k, a)
            return legacy is INERT or legacy == b[k]
        return a.get(k, "(absent)") == b.get(k, "(absent)")
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if not free(k) and not same(k)]


def validate_required(cfg: DictConfig) -> None:
    """`???` values (model.path, dataset.name, ...) must be given on the command line."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    _check(not missing, missing[0] if missing else "", "???", "a value: this option needs it (pass key=...)")


def validate(cfg: DictConfig) -> None:
    """Check a composed train config; raise ConfigError naming the first bad key."""
    validate_required(cfg)
    _number(cfg, "seed", low=0, integer=True)
    validate_dataset(cfg)
    validate_corruption(cfg, int(cfg.dataset.resolution))
    validate_train(cfg)
    if "dedup" in cfg:
        validate_dedup(cfg)
    _in(cfg, "model.kind", MODEL_KINDS)
    if "conditional" in cfg.model:
        conditional = cfg.model.conditional
        _check(conditional is True or conditional is False or conditional == "auto", "model.conditional", conditional,
               "true | false | auto (class-conditional when the dataset has class labels)")
    validate_text(cfg)
    if cfg.model.kind in ("unet", "unet_text"):
        factor = 2 ** (len(cfg.model.block_out_channels) - 1)
        _check(cfg.dataset.resolution % factor == 0, "dataset.resolution", cfg.dataset.resolution,
               f"a multiple of {factor} for model={cfg.model.name}")
    _in(cfg, "loss.kind", LOSS_KINDS)
    if cfg.model.kind == "latent_pipeline":
        validate_latent_pipeline(cfg)
    if cfg.model.kind in ("pretrained", *PIPELINE_KINDS):
        _check(cfg.loss.kind == "ddpm", "loss", cfg.loss.kind,
               f"ddpm with model={cfg.model.kind} (loss=ddpm, or experiment=finetune / finetune_text)")
    if cfg.loss.kind == "ddpm":
        _in(cfg, "loss.prediction_type", PREDICTION_TYPES)
    if cfg.loss.kind == "edm":
        _in(cfg, "loss.hidden_precond", HIDDEN_PRECOND)
    validate_sampler(cfg)
    validate_noisy(cfg)
    validate_logger(cfg)
    if "privacy" in cfg:
        validate_privacy(cfg)
    resume = cfg.get("resume")
    _check(resume in (*RESUME, None) or Path(str(resume)).is_dir(), "resume", resume,
           " | ".join(RESUME) + " | an existing checkpoint directory")
    _number(cfg, "sample.count", low=0, integer=True)
    _number(cfg, "sample.batch_size", low=1, integer=True)
    if "evaluate" in cfg:
        _in(cfg, "evaluate.after_train", [True, False])
        overrides = cfg.evaluate.overrides
        _check(OmegaConf.is_list(overrides) and all(isinstance(o, str) for o in overrides),
               "evaluate.overrides", overrides, "a list of evaluate.py overrides, e.g. [attack.samples_per_prompt=50]")


def evaluate_config(run_dir, overrides=()) -> DictConfig:
    """conf/evaluate.yaml for run_dir, as `python evaluate.py run_dir=RUN_DIR *overrides` builds it.

    For train.py's evaluate.after_train: needs Hydra initialized, as it is inside @hydra.main.
    The path is quoted because sweep run directories contain '=' and ','.
    """
    from hydra import compose

    return compose(config_name="evaluate", overrides=[f"run_dir={rundir.hydra_quoted(str(run_dir))}", *overrides])


def validate_evaluate(cfg: DictConfig) -> None:
    """Check an evaluate.py config: one input mode, and every attack threshold in range."""
    has_run, has_model = bool(cfg.get("run_dir")), bool(cfg.get("model_path"))
    has_folders = bool(cfg.get("samples"))
    _check(has_run + has_model + has_folders == 1, "run_dir", cfg.get("run_dir"),
           "a run directory, or model=DIR with train_data=DIR, or samples=DIR with train_data=DIR (one of them)")
    if has_run:
        _check(not cfg.get("train_data"), "train_data", cfg.get("train_data"),
               "null with run_dir (the run's members are rebuilt from the run)")
        _check((Path(cfg.run_dir) / rundir.SPLIT).is_file(), "run_dir", cfg.run_dir,
               "a directory written by train.py (split.json and model/ inside)")
        if cfg.get("checkpoint") is not None:
            _number(cfg, "checkpoint", low=0, integer=True)
    elif has_model:
        _check(Path(str(cfg.model_path)).expanduser().is_dir(), "model", cfg.model_path,
               "an existing diffusers pipeline or UNet folder")
        _check(cfg.get("train_data") is not None and Path(str(cfg.train_data)).is_dir(), "train_data",
               cfg.get("train_data"), "an existing directory of the model's training images")
        _in(cfg, "model_sampler", ("ddim", "ddpm_ancestral"))
        if cfg.get("reference_data") is not None:
            _check(Path(str(cfg.reference_data)).is_dir(), "reference_data", cfg.reference_data, "an existing directory")
        if cfg.get("resolution") is not None:
            _number(cfg, "resolution", low=MIN_RESOLUTION, integer=True)
    else:
        for key in ("samples", "train_data"):
            _check(cfg.get(key) is not None and Path(str(cfg[key])).is_dir(), key, cfg.get(key), "an existing directory")
        _in(cfg, "channels", CHANNELS)
        if cfg.get("resolution") is not None:
            _number(cfg, "resolution", low=MIN_RESOLUTION, integer=True)
        samples = Path(str(cfg.samples))
        loose = [p.name for p in samples.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        folders = [p for p in samples.iterdir() if p.is_dir()]
        _check(not (loose and folders), "samples", cfg.samples,
               f"one sub-folder per prompt or a flat folder of images, not both ({len(loose)} images, e.g. "
               f"{loose[:1]}, beside {len(folders)} sub-folders would be ignored)")
    _check(has_run or cfg.get("checkpoint") is None, "checkpoint", cfg.get("checkpoint"),
           "null unless run_dir is given (a step of the run's checkpoints)")
    _number(cfg, "seed", low=0, integer=True)
    validate_device(cfg)
    inception = cfg.attack.get("inception_weights")
    if inception:
        _check(Path(str(inception)).expanduser().is_file(), "attack.inception_weights", inception,
               "null or an existing file of torchvision Inception-v3 weights")
    validate_attack(cfg)


def validate_device(cfg: DictConfig) -> None:
    device = str(cfg.get("device", "auto"))
    _check(device in DEVICES or (device.startswith("cuda:") and device[5:].isdigit()), "device", device,
           " | ".join(DEVICES) + " | cuda:N")
    if device.startswith("cuda"):
        import torch  # only here: a CUDA device was asked for

        _check(torch.cuda.is_available(), "device", device, "auto | cpu: this machine has no CUDA device")


def _check_prompts(cfg: DictConfig) -> None:
    prompts = OmegaConf.select(cfg, "attack.prompts")
    ok = prompts in ("all", None) or (isinstance(prompts, int) and not isinstance(prompts, bool) and prompts >= 1)
    ok = ok or (OmegaConf.is_list(prompts) and len(prompts) > 0
                and all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in prompts))
    _check(ok, "attack.prompts", prompts, "all | k >= 1 (text models: the k most duplicated captions) | "
           "a list of class indices >= 0 (class-conditional models)")


def _validate_mia_attacks(cfg: DictConfig) -> None:
    mia = cfg.mia
    if "attacks" in mia:
        attacks = mia.attacks
        _check(OmegaConf.is_list(attacks) and all(a in MIA_ATTACKS for a in attacks), "mia.attacks",
               attacks if not OmegaConf.is_list(attacks) else list(attacks), "a list of " + " | ".join(MIA_ATTACKS))
    if "multi_t" in mia:
        steps = mia.multi_t.timesteps
        ok = OmegaConf.is_list(steps) and len(steps) > 0 and all(
            isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 999 for t in steps)
        _check(ok, "mia.multi_t.timesteps", steps if not OmegaConf.is_list(steps) else list(steps),
               "a non-empty list of integers in [1, 999]")
    if "secmi" in mia:
        _number(cfg, "mia.secmi.interval", low=1, integer=True)
        _number(cfg, "mia.secmi.t_sec", low=2, high=999, integer=True)
        t_sec, k = mia.secmi.t_sec, mia.secmi.interval
        _check(t_sec % k == 0 and t_sec >= 2 * k, "mia.secmi.t_sec", t_sec,
               f"a multiple of mia.secmi.interval={k}, at least {2 * k}")
    if "pia" in mia:
        _number(cfg, "mia.pia.timestep", low=1, high=999, integer=True)
        _number(cfg, "mia.pia.p", low=1)
    if "mask_draws" in mia:
        _number(cfg, "mia.mask_draws", low=1, integer=True)


def validate_attack(cfg: DictConfig) -> None:
    """The attack, MIA and logger settings of an evaluate config (everything but its inputs)."""
    a = "attack"
    _check_prompts(cfg)
    _number(cfg, f"{a}.samples_per_prompt", low=1, integer=True)
    _number(cfg, f"{a}.batch_size", low=1, integer=True)
    _number(cfg, f"{a}.tiles", low=1, integer=True)
    _number(cfg, f"{a}.min_clique", low=2, integer=True)
    _number(cfg, f"{a}.num_masks", low=1, integer=True)
    for key in ("edge_threshold", "delta", "adaptive_alpha", "gu_threshold"):
        if key == "delta" and cfg.attack.delta == "auto":
            continue  # calibrated on the null reference
        _number(cfg, f"{a}.{key}", low=0, high=1 if key != "adaptive_alpha" else None)
    _number(cfg, f"{a}.adaptive_n", low=1, integer=True)
    if cfg.attack.get("lowpass", "auto") != "auto":
        _number(cfg, f"{a}.lowpass", low=0)
    _in(cfg, f"{a}.features", ATTACK_FEATURES)
    if "feature_resolution" in cfg.attack:
        _number(cfg, f"{a}.feature_resolution", low=32, integer=True)
    _number(cfg, f"{a}.cfg_scale", low=0)
    if "inpaint" in cfg.attack:
        _in(cfg, f"{a}.inpaint.enabled", (True, False))
        _in(cfg, f"{a}.inpaint.region", INPAINT_REGIONS)
        _number(cfg, f"{a}.inpaint.fraction", low=0, high=1, high_open=True)
        _number(cfg, f"{a}.inpaint.samples", low=1, integer=True)
        _number(cfg, f"{a}.inpaint.max_images", low=1, integer=True)
        _number(cfg, f"{a}.inpaint.delta", low=0, high=1)
        if cfg.attack.inpaint.get("num_steps") is not None:
            _number(cfg, f"{a}.inpaint.num_steps", low=2, integer=True)
    _number(cfg, "mia.timestep", low=1, high=999, integer=True)
    _number(cfg, "mia.draws", low=1, integer=True)
    _number(cfg, "mia.seed", low=0, integer=True)
    if "calibration" in cfg.mia:
        _in(cfg, "mia.calibration", ("none", "split"))
        _number(cfg, "mia.calibration_fraction", low=0, high=1, high_open=True)
    _validate_mia_attacks(cfg)
    if "canaries" in cfg:
        _in(cfg, "canaries.enabled", (True, False))
    if cfg.get("reference_data"):
        _check(Path(str(cfg.reference_data)).is_dir(), "reference_data", cfg.reference_data,
               "null or an existing folder of real images the model never trained on")
    validate_logger(cfg)
