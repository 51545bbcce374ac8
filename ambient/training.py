"""The training loop: accelerate, EMA, atomic checkpoints, resume, and the final model + samples.

Batches are a pure function of (seed, step): micro-step k of the whole job reads positions
[k·G, (k+1)·G) of a stream of seeded per-epoch permutations (G = global micro-batch), and each
rank takes its own slice. A resumed or differently-sharded run therefore sees the same images
at the same step, and the corruption of each image depends only on its index.
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ambient.checkpoints import (
    StopRequest,
    last_logged_loss,
    latest_or,
    prepare_run_dir,
    save_checkpoint,
    truncate_metrics,
)
from ambient.config import LOSS_KINDS, PIPELINE_KINDS, ConfigError, noisy_ambient
from ambient.data import ImageSet, dataset_change, load_dataset, split_holdout
from ambient.defenses.augment import build_augment
from ambient.defenses.corruption import CorruptedImages, build_corruption
from ambient.defenses.dedup import prepare_training_set
from ambient.defenses.loss_drop import build_loss_drop
from ambient.defenses.privacy import DPSGD, check_processes
from ambient.defenses.privacy import enabled as privacy_enabled
from ambient.errors import Interrupted, RunRefused
from ambient.images import save_grid, to_unit
from ambient.losses import AmbientDDPMLoss, AmbientEDMLoss, AmbientNoisyDDPMLoss, AmbientNoisyEDMLoss
from ambient.models import build_model
from ambient.pipeline import load_run, save_trained
from ambient.precond import DDPMPrecond, EDMPrecond
from ambient.rundir import ModelDir, RunDir, RunLock
from ambient.seeding import Stream, seeded_generator
from ambient.tracking import make_tracker


class TrainState:
    """The step counter and training seconds so far, checkpointed with the model (accelerate custom
    object), so a resumed run's summary counts every segment."""

    def __init__(self):
        self.step, self.seconds = 0, 0.0
        self.started, self.before = time.time(), 0.0  # this segment's start; seconds of earlier ones

    def total_seconds(self) -> float:
        return self.before + time.time() - self.started

    def state_dict(self):
        return {"step": self.step, "seconds": self.seconds}

    def load_state_dict(self, state):
        self.step, self.seconds = int(state["step"]), float(state.get("seconds", 0.0))
        self.before = self.seconds


def micro_batch_rows(micro_step: int, global_batch: int, n: int, seed: int) -> torch.Tensor:
    """Rows of the training set read at one micro-step, across all ranks."""
    first, last = micro_step * global_batch, (micro_step + 1) * global_batch - 1
    if first // n == last // n:  # the usual case: one epoch's permutation, one slice
        return _epoch_order(n, seed, first // n)[first % n:last % n + 1].clone()
    pos = torch.arange(first, last + 1)
    epochs, offsets = pos // n, pos % n
    rows = torch.empty_like(pos)
    for epoch in epochs.unique().tolist():
        rows[epochs == epoch] = _epoch_order(n, seed, epoch)[offsets[epochs == epoch]]
    return rows


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation of the n rows, drawn once per epoch rather than at every step (a
    randperm of 60,000 per step costs about as much as a small UNet's GPU step)."""
    return torch.randperm(n, generator=seeded_generator(seed, epoch, Stream.ORDER))


def build_objective(cfg: DictConfig, unet, mask_channel: bool):
    """The denoiser wrapper and its loss, from the `loss` group."""
    assert cfg.loss.kind in LOSS_KINDS
    if cfg.loss.kind == "edm":
        net = EDMPrecond(unet, cfg.loss.sigma_data, mask_channel, cfg.loss.hidden_precond)
        if noisy_ambient(cfg):  # corruption=noise, loss.noisy=ambient: Tweedie-matched, σ_t ≥ σ_n only
            loss = AmbientNoisyEDMLoss(cfg.corruption.sigma, cfg.loss.P_mean, cfg.loss.P_std, cfg.loss.sigma_data,
                                       cfg.train.fused_loss, cfg.loss.get("consistency_weight", 0.0))
        else:
            loss = AmbientEDMLoss(cfg.loss.P_mean, cfg.loss.P_std, cfg.loss.sigma_data, cfg.train.fused_loss)
        return net, loss, None
    if cfg.model.kind in PIPELINE_KINDS:  # the noise schedule the pipeline samples with, not loss.beta_schedule
        scheduler = DDPMScheduler.from_pretrained(cfg.model.path, subfolder="scheduler",
                                                  prediction_type=cfg.loss.prediction_type)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=cfg.loss.num_train_timesteps,
                                  beta_schedule=cfg.loss.beta_schedule, prediction_type=cfg.loss.prediction_type)
    net = DDPMPrecond(unet, scheduler.alphas_cumprod, cfg.loss.prediction_type, mask_channel)
    if noisy_ambient(cfg):  # the same objective in DDPM form: steps t ≥ t_n only
        return net, AmbientNoisyDDPMLoss(cfg.corruption.sigma, scheduler.config.num_train_timesteps,
                                         scheduler.alphas_cumprod, cfg.loss.snr_weight, cfg.train.fused_loss), scheduler
    loss = AmbientDDPMLoss(scheduler.config.num_train_timesteps, scheduler.alphas_cumprod, cfg.loss.snr_weight,
                           cfg.train.fused_loss)
    return net, loss, scheduler


def model_settings(cfg: DictConfig, data: ImageSet, mask_channel: bool, num_classes: int, text: bool = False) -> dict:
    """What sampling and the attack need to know about a trained model (saved in the model pipeline's config)."""
    return {
        "conditioning": "text" if text else "class" if num_classes else "none",
        "text_encoder": OmegaConf.to_container(cfg.text_encoder, resolve=True) if text else None,
        "captions": OmegaConf.to_container(cfg.captions, resolve=True) if text else None,
        "objective": cfg.loss.kind,
        "sigma_data": cfg.loss.get("sigma_data", 0.5),
        "hidden_precond": cfg.loss.get("hidden_precond"),
        "prediction_type": cfg.loss.get("prediction_type"),
        "mask_channel": mask_channel,
        "corruption": OmegaConf.to_container(cfg.corruption, resolve=True),
        "noisy": noisy_settings(cfg),
        "delta": float(cfg.corruption.delta),
        "channels": data.channels,
        "resolution": data.resolution,
        "num_classes": num_classes,
        "class_names": data.class_names if num_classes else None,
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "seed": int(cfg.seed),
        "train_steps": int(cfg.train.steps),
    }


def noisy_settings(cfg: DictConfig) -> dict | None:
    """corruption=noise: how y was trained on, σ_n, and the lowest level the denoiser was trained at
    (None: every level, as for clean data or with the consistency loss; the naive model learned to
    denoise towards y, not x0)."""
    if cfg.corruption.kind != "noise":
        return None
    ambient = noisy_ambient(cfg)
    sigma_n, consistency = float(cfg.corruption.sigma), float(cfg.loss.get("consistency_weight", 0.0))
    return {"objective": "ambient" if ambient else "naive", "sigma_n": sigma_n,
            "lowest_trained_sigma": sigma_n if ambient and not consistency else None,  # consistency: all levels
            "consistency_weight": consistency}


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train as configured, writing everything under run_dir; returns the summary dict."""
    run = RunDir(run_dir)
    run_dir = run.path
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    lock = RunLock(run)
    try:
        return _train_locked(cfg, run, accelerator, lock)
    except BaseException as err:
        # Only a launch that held the run directory may record its failure there (train.py).
        err.ambient_owned_run = lock.held
        raise
    finally:
        lock.release()
        accelerator.end_training()
        # Hydra's basic launcher runs sweep jobs in this process; the next may ask for other precision.
        AcceleratorState._reset_state()


def _dataset_changed(run: RunDir, identities: dict) -> str | None:
    """A resumed run must see the images it started with: masks and the split follow the stable
    index, so a re-indexed folder would give images new masks (more pixels seen than allowed)."""
    return dataset_change(run.read_images(), identities, run.path,
                          f"restore it (see {run.images}) or train a new run")


def _split_changed(run: RunDir, members: ImageSet, holdout: ImageSet) -> str | None:
    """A resumed run must keep its members: the split is recomputed from the config on every start, and a
    version that splits differently (e.g. planted copies now follow their original) would swap images."""
    if not run.split.is_file():
        return None
    recorded = run.read_split()
    if recorded == {"members": members.indices.tolist(), "holdout": holdout.indices.tolist()}:
        return None
    return (f"the member/holdout split of run_dir={run.path} is not the one it was trained with ({run.split}): "
            "this version splits its images differently; finish it with the version that started it, "
            "or train a new run")


def _agree(accelerator, error: str | None, raise_here: bool = True) -> None:
    """Raise on every rank what the main rank found (a refusal), so no rank waits for the others."""
    flag = [error]
    if accelerator.num_processes > 1:
        broadcast_object_list(flag)
    if flag[0] and raise_here:
        raise RunRefused(flag[0])


def _train_locked(cfg: DictConfig, run: RunDir, accelerator, lock: RunLock) -> dict:
    run_dir, main = run.path, accelerator.is_main_process
    check_processes(cfg.get("privacy"), accelerator.num_processes)  # before the lock: nothing is written
    refusal, failure, resume_from = None, None, None
    if main:  # one lock per launch: the main rank holds it for all ranks
        try:
            lock.acquire()
            resume_from = prepare_run_dir(run, cfg)
            shutil.rmtree(run.model_tmp, ignore_errors=True)  # a final save that did not complete
            if run.model.exists() and not run.has_model():  # an older version's incomplete save
                shutil.rmtree(run.model)
            if resume_from is None:  # a fresh start: lines of an attempt without checkpoints go
                truncate_metrics(run, 0)
        except RunRefused as err:
            refusal = str(err)
        except Exception as err:  # the other ranks must not wait for a broadcast that never comes
            refusal, failure = f"the main rank failed: {type(err).__name__}: {err}", err
    if failure is not None:
        _agree(accelerator, refusal, raise_here=False)
        raise failure
    _agree(accelerator, refusal)
    if not main:
        resume_from = latest_or(run, cfg)
    t0 = time.time()

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run of this config
    data = load_dataset(cfg.dataset)  # with dataset.duplicate's planted copies, if any
    data_ids = data.identities() if main else None
    changed = None
    if main:
        try:
            changed = _dataset_changed(run, data_ids)
        except Exception as err:  # e.g. an unreadable images.json: every rank stops, none hangs
            changed = f"{run.images}: {type(err).__name__}: {err}"
    _agree(accelerator, changed)
    # Dedup before the split: holdout images must not have copies among the members. Writes dedup.json.
    data, dedup_info = prepare_training_set(cfg, data, run_dir if main else None)
    members, holdout = split_holdout(data, cfg.dataset.holdout, cfg.seed)
    _agree(accelerator, _split_changed(run, members, holdout) if main and resume_from is not None else None)
    if cfg.model.kind == "latent_pipeline":  # from here on the members are VAE latents, each encoded once
        members = _latent_members(cfg, members, run, accelerator)
    corruption = build_corruption(cfg.corruption)
    # A pipeline's UNet keeps its shape (official Ambient IF code): masked input, no mask channel.
    mask_channel = corruption.masks_pixels and cfg.model.kind not in PIPELINE_KINDS
    text = is_text_conditional(cfg)
    conditioning = None
    if text:  # imports the text encoder's libraries only when needed
        from ambient.text import build_text_conditioning

        conditioning = build_text_conditioning(cfg, members, run_dir if main else None)
    num_classes = 0
    if class_conditional(cfg.model.conditional, members, text):
        if members.labels is None:
            raise ConfigError("model.conditional=true but the dataset has no labels")
        num_classes = data.num_classes
    dataset = CorruptedImages(members, corruption, cfg.seed, cfg.corruption.delta, cfg.corruption.resample_delta,
                              build_augment(cfg.train.augment), bool(num_classes),
                              cfg.corruption.get("mask_key", "index"))
    width = conditioning.embeddings.encoder.dim if text else None
    unet = build_model(cfg.model, members.channels, members.resolution, mask_channel, num_classes, width)
    net, loss_fn, scheduler = build_objective(cfg, unet, mask_channel)
    settings = model_settings(cfg, members, mask_channel, num_classes, text)
    if cfg.model.kind == "latent_pipeline":  # model/ samples latents; model/pipeline decodes them
        settings["latent"] = {"image_channels": data.channels, "image_resolution": data.resolution,
                              "finetune": cfg.model.get("finetune", "full")}
    settings["dedup"] = dedup_info  # the evaluator maps an extracted image to every duplicate it stands for
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        run.write_config(cfg)
        run.write_split(members.indices.tolist(), holdout.indices.tolist())
        if not run.images.is_file():
            run.write_images(data_ids)

    # Only what trains: every weight, or a LoRA fine-tune's adapters (ambient/lora.py).
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay)
    warmup = max(1, cfg.train.lr_warmup_steps)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    ema = EMAModel(unet.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=True, power=2 / 3)
    dp = None
    if privacy_enabled(cfg.get("privacy")):  # per-sample clipping and noise (ambient/defenses/privacy.py)
        dp = DPSGD(cfg.privacy, len(dataset), cfg.train.batch_size, cfg.train.steps, cfg.seed)
        net, opt = dp.make_private(net, opt)
        accelerator.print(f"DP-SGD: noise multiplier {dp.sigma:.4g}, sample rate {dp.rate:.4g}, clip {dp.max_grad_norm}"
                          + (" (every row in every batch: no amplification by sampling)" if dp.rate >= 1 else ""))
    net, opt, lr_sched = accelerator.prepare(net, opt, lr_sched)
    ema.to(accelerator.device)
    state = TrainState()
    state.started = t0
    drop = build_loss_drop(cfg.train.get("loss_drop"))  # Wen et al. 2024 (ambient/defenses/loss_drop.py)
    accelerator.register_for_checkpointing(ema, state, *([dp.state] if dp else []), *([drop] if drop else []))
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        if dp is not None:
            dp.check_resume()
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
        if main:  # steps logged after that checkpoint are trained again: drop their old lines
            truncate_metrics(run, state.step)
    else:  # distinct noise per rank; a resume restores these generators from the checkpoint instead
        torch.manual_seed(cfg.seed + 1 + accelerator.process_index)

    tracker = make_tracker(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True)) if main else None
    exit_code = 1
    try:
        if run.has_model():  # the final model was saved, then the run stopped: finish what is left
            saved = ModelDir(run.model).read_settings().get("train_steps", cfg.train.steps)
            if saved != cfg.train.steps:
                raise RunRefused(f"run_dir={run_dir} holds the final model of a {saved}-step run; train.steps="
                                 f"{cfg.train.steps} does not match: resume with train.steps={saved}, "
                                 f"or move {run.model} aside to continue training")
            last_loss = last_logged_loss(run)
        else:
            last_loss = _loop(cfg, accelerator, net, unet, opt, lr_sched, ema, state, dataset, loss_fn, tracker,
                              run_dir, conditioning, dp, drop)
        if dp is not None:  # the guarantee, next to the weights it covers (the model's settings) and in the summary
            settings["privacy"] = dp.record()
        summary = _finish(cfg, accelerator, unet, ema, scheduler, settings, run_dir, tracker, members, conditioning)
        summary.update(final_loss=last_loss, train_seconds=round(state.total_seconds(), 1))
        if dp is not None:
            summary["privacy"] = settings["privacy"]
        if drop is not None:
            summary["loss_drop"] = drop.summary()
        if main:
            run.failed.unlink(missing_ok=True)  # an earlier attempt's failure, now superseded
            run.write_summary(summary)  # last: the run is finished (RunDir.is_finished)
        exit_code = 0
        return summary
    finally:
        if tracker is not None:
            tracker.finish(exit_code)


def _latent_members(cfg, members: ImageSet, run: RunDir, accelerator) -> ImageSet:
    """The members' VAE latents (ambient/latents.py): the main rank encodes what the cache lacks and
    writes it, then the other ranks read it."""
    from ambient.latents import encode_members

    with accelerator.main_process_first():
        return encode_members(members, cfg.model.path, run.latents, accelerator.device)


def class_conditional(setting, members: ImageSet, text: bool) -> bool:
    """model.conditional: true | false | auto (class labels when the dataset has them and captions
    do not condition the model)."""
    if setting == "auto":
        return not text and members.labels is not None and int(members.labels.max()) >= 1
    return bool(setting)


def is_text_conditional(cfg: DictConfig) -> bool:
    return cfg.get("text_encoder") is not None and cfg.text_encoder.kind != "none"


def _loop(cfg, accelerator, net, unet, opt, lr_sched, ema, state, dataset, loss_fn, tracker, run_dir,
          conditioning=None, dp=None, drop=None) -> float:
    tc = cfg.train
    running, count, last = 0.0, 0, math.nan
    bar = tqdm(total=tc.steps, initial=state.step, desc="training", disable=not accelerator.is_main_process)
    with StopRequest() as stop:
        while state.step < tc.steps:
            running, count, last = _step(cfg, accelerator, net, unet, opt, lr_sched, ema, state, dataset, loss_fn,
                                         tracker, run_dir, conditioning, bar, running, count, last, dp, drop)
            if stop.requested(accelerator):
                checkpoint = RunDir(run_dir).checkpoints / f"checkpoint-{state.step:07d}"
                if not checkpoint.is_dir():
                    state.seconds = state.total_seconds()
                    save_checkpoint(accelerator, RunDir(run_dir).checkpoints, state.step, tc.checkpoints_keep)
                raise Interrupted(f"stopped by {stop.signal or 'a signal on another rank'} at step {state.step}; "
                                  f"checkpoint saved in {checkpoint}")
    bar.close()
    if count == 0 and math.isnan(last):  # resumed at (or past) the last step: nothing was trained here
        return last_logged_loss(RunDir(run_dir))
    return last if count == 0 else running / count


def _step(cfg, accelerator, net, unet, opt, lr_sched, ema, state, dataset, loss_fn, tracker, run_dir, conditioning,
          bar, running, count, last, dp=None, drop=None):
    """One optimizer step (grad_accum micro-steps), its log line and checkpoint; returns the loss tally.
    With DP-SGD (dp) the batch is Poisson-sampled and its per-sample gradients are clipped and noised;
    with loss-drop (drop) suspiciously low per-sample losses are left out of the objective."""
    tc = cfg.train
    per_rank, ranks, accum = tc.batch_size, accelerator.num_processes, tc.grad_accum
    rank = accelerator.process_index
    net.train()
    for k in range(accum):
        if dp is not None:
            rows = dp.rows(state.step)
            if len(rows) == 0:  # an empty Poisson batch: the step adds noise only (the accountant counts it)
                dp.backward(None, net.parameters())
                continue
        else:
            rows = micro_batch_rows(state.step * accum + k, per_rank * ranks, len(dataset), cfg.seed)
            rows = rows[rank * per_rank:(rank + 1) * per_rank]
        batch = dataset.batch(rows, state.step)
        if conditioning is not None:  # caption embeddings go where class labels would
            batch["cond"] = conditioning(rows, state.step)
        if dp is not None:
            batch = dp.expand(batch)
        batch = {key: v.to(accelerator.device) for key, v in batch.items()}
        sync = nullcontext() if k == accum - 1 else accelerator.no_sync(net)
        with sync, accelerator.autocast():
            per_sample = loss_fn(net, batch["obs"], batch["mask"], batch["mask_tilde"], batch.get("cond"))
            loss = per_sample.mean()  # logged over every sample, dropped or not
            if dp is not None:
                dp.backward(per_sample, net.parameters(), accelerator.backward)
            elif drop is not None:
                accelerator.backward(drop.reduce(per_sample, loss_fn.last_level, batch["index"], state.step) / accum)
            else:
                accelerator.backward(loss / accum)
        # .item() is a device sync; a NaN must stop the run before the optimizer spreads it.
        value = loss.detach().float()
        if ranks > 1:
            value = accelerator.reduce(value, "mean")
        if not math.isfinite(value.item()):
            raise FloatingPointError(f"loss is {value.item()} at step {state.step}: training diverged "
                                     "(try a lower train.lr, train.grad_clip, or mixed_precision=no)")
        running, count = running + value.item(), count + 1
    if tc.grad_clip and dp is None:  # DP-SGD clips each image's gradient instead
        accelerator.clip_grad_norm_(net.parameters(), tc.grad_clip)
    opt.step()
    if dp is not None:
        dp.stepped()
    lr_sched.step()
    opt.zero_grad(set_to_none=True)
    ema.step(unet.parameters())
    state.step += 1
    bar.update(1)
    if tracker is not None and (state.step % max(1, tc.log_every) == 0 or state.step == tc.steps) and count:
        last = running / count
        extra = {"epsilon": dp.epsilon()} if dp is not None else {}
        extra.update(drop.log() if drop is not None else {})
        tracker.log({"loss": last, "lr": lr_sched.get_last_lr()[0], "ema_decay": ema.cur_decay_value, **extra},
                    state.step)
        bar.set_postfix(loss=f"{last:.4f}")
        running, count = 0.0, 0
    # The last step too: a run stopped during its final save resumes here instead of retraining.
    if tc.checkpoint_every and (state.step % tc.checkpoint_every == 0 or state.step == tc.steps):
        state.seconds = state.total_seconds()
        save_checkpoint(accelerator, RunDir(run_dir).checkpoints, state.step, tc.checkpoints_keep)
    return running, count, last


def _save_final_model(cfg, accelerator, unet, ema, scheduler, settings, run: RunDir, conditioning) -> None:
    """The EMA weights as a diffusers model, written to model.tmp/ and renamed to model/ when complete."""
    model = accelerator.unwrap_model(unet)
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        from ambient.lora import has_lora, merged, save_lora

        shutil.rmtree(run.model_tmp, ignore_errors=True)
        plain = merged(model)  # LoRA: the adapters merged into a plain copy, so every saved UNet loads alone
        save_trained(run.model_tmp, plain, settings, scheduler, run.captions if conditioning else None,
                     conditioning.embeddings.encoder if conditioning else None)
        if _exports_source_pipeline(cfg):  # the fine-tuned UNet dropped back into its source pipeline
            from ambient.pipelines import save_finetuned_pipeline

            save_finetuned_pipeline(cfg.model.path, plain, ModelDir(run.model_tmp).pipeline)
        if has_lora(model):  # and the adapters alone, for pipeline.load_lora_weights
            save_lora(model, ModelDir(run.model_tmp).path / "lora")
        os.replace(run.model_tmp, run.model)
    finally:
        ema.restore(model.parameters())


def _exports_source_pipeline(cfg) -> bool:
    """A pipeline fine-tune is also saved into a copy of its source pipeline (model/pipeline/) only when
    that pipeline samples it correctly: it draws no ambient mask, so a masked fine-tune would see
    unmasked inputs it never trained on (the model/ AmbientPipeline samples those correctly)."""
    return cfg.model.kind in PIPELINE_KINDS and not build_corruption(cfg.corruption).masks_pixels


def _finish(cfg, accelerator, unet, ema, scheduler, settings, run_dir, tracker, members, conditioning=None) -> dict:
    """Save the EMA weights as a diffusers model, then sample it from disk into a grid."""
    accelerator.wait_for_everyone()
    summary = {"run_dir": str(run_dir), "steps": int(cfg.train.steps), "members": len(members)}
    if not accelerator.is_main_process:
        return summary
    run = RunDir(run_dir)
    if not run.has_model():
        _save_final_model(cfg, accelerator, unet, ema, scheduler, settings, run, conditioning)
    if _exports_source_pipeline(cfg):
        summary["pipeline"] = str(ModelDir(run.model).pipeline)
    summary["model"] = str(run.model)
    if cfg.sample.count and cfg.model.kind == "latent_pipeline":  # decoded by the exported pipeline's VAE
        from ambient.latents import generate_with_latent_pipeline

        captions = sorted(set(members.prompts))[:10]
        per = max(1, cfg.sample.count // len(captions))
        images = generate_with_latent_pipeline(summary["pipeline"], [c for c in captions for _ in range(per)],
                                               cfg.sampler.num_steps, cfg.sample.cfg_scale, cfg.sample.seed,
                                               accelerator.device)
        summary["samples"] = str(save_grid(to_unit(images), run.samples, nrow=per))
        tracker.log_image("samples", run.samples, int(cfg.train.steps))
    elif cfg.sample.count:
        trained = load_run(run_dir, accelerator.device)
        classes = settings["num_classes"]
        if conditioning is not None:  # one row per caption, the first ten distinct ones
            captions = sorted(set(members.prompts))[:10]
            per = max(1, cfg.sample.count // len(captions))
            images = torch.cat([trained.generate(per, cfg.sample.seed, None, cfg.sample.batch_size, caption=c,
                                                 cfg_scale=cfg.sample.cfg_scale) for c in captions])
            grid = save_grid(to_unit(images), run.samples, nrow=per)
        elif classes:
            per = max(1, cfg.sample.count // classes)
            images = torch.cat([trained.generate(per, cfg.sample.seed, c, cfg.sample.batch_size) for c in range(classes)])
            grid = save_grid(to_unit(images), run.samples, nrow=per)
        else:
            images = trained.generate(cfg.sample.count, cfg.sample.seed, None, cfg.sample.batch_size, progress=True)
            grid = save_grid(to_unit(images), run.samples)
        summary["samples"] = str(grid)
        tracker.log_image("samples", grid, int(cfg.train.steps))
    return summary
