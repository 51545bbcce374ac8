"""evaluate.py's work: generate from a run (resumably), attack it, measure membership, report.

Two inputs: a run directory made by train.py (its model, and its training set rebuilt exactly as
trained from the saved dataset settings and split.json), or a folder of generations plus a
folder of training images, so any model's outputs can be audited.
"""
from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from ambient import rundir
from ambient.attack import schema
from ambient.attack.membership import loss_scores
from ambient.attack.report import write_report
from ambient.attack.run import TrainingImages, run_attack
from ambient.attack.semantic import MIN_TRAIN, semantic_quality
from ambient.attack.streaming import ConcatSource, PngFiles, rows_of, stream_nearest
from ambient.card import write_model_card
from ambient.config import ConfigError
from ambient.data import IMAGE_SUFFIXES, ImageSet, dataset_change, load_dataset, load_imagefolder
from ambient.defenses.dedup import duplicate_map
from ambient.images import save_grid, to_unit
from ambient.latent_model import LatentModel
from ambient.launch import Shard
from ambient.membership_eval import ScoredRows, conditioning, loss_attack, roc_figures, stronger_membership
from ambient.pipeline import AmbientPipeline as TrainedModel
from ambient.pipeline import load_run
from ambient.seeding import Stream, seeded_generator
from ambient.tracking import make_tracker

log = logging.getLogger(__name__)


def prompts_of(model: TrainedModel, wanted, captions: list[str] | None = None) -> dict[str, int | str | None]:
    """Prompt name -> what to generate from: a class label, a caption (text models), or None.

    Text models are prompted with their training captions, the most duplicated first (Carlini et
    al. 2023 rank Stable Diffusion's captions so); wanted = "all" or k keeps the k most duplicated.
    """
    if model.is_text:
        if not captions:
            raise ValueError("a text-conditional model is attacked with its training captions; none were found")
        ranked = sorted(Counter(captions).items(), key=lambda kv: (-kv[1], kv[0]))
        if wanted not in (None, "all"):
            if not isinstance(wanted, int):
                raise ConfigError(f"attack.prompts={wanted!r} is invalid for a text-conditional model; "
                                  f"allowed: all | k (the k most duplicated of its {len(ranked)} captions)")
            ranked = ranked[:wanted]
        return {f"caption_{k:04d}_{_slug(c)}": c for k, (c, _) in enumerate(ranked)}
    classes = model.settings.get("num_classes") or 0
    if not classes:
        if wanted not in (None, "all"):
            raise ConfigError(f"attack.prompts={wanted!r} is invalid for an unconditional model; allowed: all")
        return {"unconditional": None}
    names = model.settings.get("class_names") or [str(c) for c in range(classes)]
    if wanted in (None, "all"):
        labels = range(classes)
    elif isinstance(wanted, int) or any(not 0 <= int(c) < classes for c in wanted):
        raise ConfigError(f"attack.prompts={wanted!r} is invalid for this class-conditional model; "
                          f"allowed: all | a list of class indices in [0, {classes - 1}]")
    else:
        labels = [int(c) for c in wanted]
    return {f"class_{names[c]}": c for c in labels}


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "empty"


def prompt_stream(prompt) -> int:
    """A prompt's own random stream, whatever other prompts are attacked with it: its class label,
    0 for the unconditional prompt, a stable hash of a caption."""
    if prompt is None:
        return 0
    if isinstance(prompt, str):
        import hashlib

        return int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=4).digest(), "little")
    return int(prompt)


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def _save_png(array: np.ndarray, path: Path) -> None:
    """Written beside its name, then renamed: a kill mid-write never leaves a broken PNG in place."""
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def generate_resumable(model: TrainedModel, prompts: dict, cfg, out: Path, model_id: str | None = None,
                       shard: Shard | None = None) -> dict[str, torch.Tensor] | None:
    """N generations per prompt as PNGs under out/samples/<prompt>/; readable files already there are
    kept, unreadable ones regenerated. The generations are keyed by the model that made them
    (model_id, e.g. ModelDir.fingerprint()) and the sampling settings: other ones are refused.

    shard: rank r of w makes the batches k with k % w == r (batches as one process cuts them, each
    image from its own (seed, prompt, position) generator, so the PNGs are those of one process);
    after all ranks are done the main rank gets the generations, the others None."""
    shard = shard or Shard()
    meta = {"model": model_id, "seed": int(cfg.seed), "num_steps": cfg.attack.num_steps,
            "guidance": cfg.attack.guidance, "num_masks": cfg.attack.num_masks}
    if model.is_text:
        meta["cfg_scale"] = float(cfg.attack.cfg_scale)
    meta_file = out / rundir.GENERATIONS / rundir.GENERATIONS_META
    if meta_file.is_file():
        try:
            before = rundir.read_json(meta_file)
        except ValueError:
            before = {"unreadable": True}
        if "model" not in before:  # made before generations were keyed by their model
            before = {**before, "model": "(not recorded)"}
        if before != meta:
            what = "another model" if before.get("model") != model_id else "other sampling settings"
            raise ValueError(f"out_dir={out} holds generations made by {what} ({meta_file}: {before}; this "
                             f"evaluation: {meta}); choose another out_dir, or delete {meta_file.parent} "
                             f"to generate anew there")
    shard.barrier()  # every rank has read the meta file before the main rank writes it
    if shard.main and not meta_file.is_file():
        meta_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = meta_file.with_name(f".{meta_file.name}.tmp")
        rundir.write_json(tmp, meta)
        os.replace(tmp, meta_file)
    n, batch, result = int(cfg.attack.samples_per_prompt), int(cfg.attack.batch_size), {}
    batches_before = 0  # batches of the prompts before this one: the global batch number decides the rank
    for name, prompt in prompts.items():
        folder = out / rundir.GENERATIONS / name
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(prompt, str) and shard.main:
            (folder / "prompt.txt").write_text(prompt)
        label, caption = (None, prompt) if isinstance(prompt, str) else (prompt, None)
        files = [folder / f"{i:06d}.png" for i in range(n)]
        mine = {start for k, start in enumerate(range(0, n, batch)) if (batches_before + k) % shard.world == shard.rank}
        batches_before += -(-n // batch)
        broken = [f for i, f in enumerate(files) if i - i % batch in mine and f.exists() and not _readable(f)]
        if broken:
            warnings.warn(f"regenerating {len(broken)} unreadable generation(s) in {folder}, e.g. {broken[0].name}")
        todo = [i for i, f in enumerate(files) if i - i % batch in mine and (not f.exists() or f in broken)]
        share = sum(min(batch, n - start) for start in mine)
        bar = tqdm(total=share, initial=share - len(todo), desc=f"generating {name}"
                   + (f" (rank {shard.rank}/{shard.world})" if shard.world > 1 else ""))
        for start in sorted({i - i % batch for i in todo}):
            count = min(batch, n - start)
            # Seed by (seed, prompt) and position, so a resumed run draws exactly the missing samples.
            images = model.generate_range(start, count, seed=cfg.seed * 100_003 + prompt_stream(prompt), label=label,
                                          num_steps=cfg.attack.num_steps, num_masks=cfg.attack.num_masks,
                                          guidance=cfg.attack.guidance, caption=caption,
                                          cfg_scale=cfg.attack.cfg_scale if caption is not None else 1.0)
            pixels = (to_unit(images) * 255).round().to(torch.uint8)
            for i, img in enumerate(pixels):
                if start + i in todo:
                    _save_png(img.permute(1, 2, 0).squeeze(-1).numpy(), files[start + i])
                    bar.update(1)
        bar.close()
        result[name] = files
    shard.barrier()
    if not shard.main:
        return None
    # Read back a block at a time by whatever needs them (never all in memory): uint8 PNG / 255.
    return {name: PngFiles(files) for name, files in result.items()}


def _reconstruction(model: TrainedModel, members: ImageSet, holdout: ImageSet, cfg, out: Path) -> dict | None:
    """The reconstruction (inpainting) attack: members vs held-out non-members (the null), with a picture."""
    from ambient.attack.reconstruction import reconstruction_scores

    icfg = cfg.attack.get("inpaint")
    if icfg is None or not icfg.enabled or len(holdout) == 0:
        return None
    if _unsupported(model, "inpaint"):  # e.g. a latent model: said so in the report, not faked
        return {"skipped": True, "note": f"reconstruction attack skipped: {_unsupported(model, 'inpaint')}"}
    cap = int(icfg.max_images)
    scores, examples = {}, {}
    for name, images in (("members", members), ("non_members", holdout)):
        rows = torch.randperm(len(images), generator=seeded_generator(int(cfg.seed), 2, Stream.INPAINT))[:cap]
        subset = images.select(rows.sort().values)
        if model.is_text:
            cond = list(subset.prompts)
        else:
            cond = subset.labels if model.settings.get("num_classes") and subset.labels is not None else None
        distance, keep, best = reconstruction_scores(
            model, subset.as_float(), subset.indices.tolist(), icfg.region, float(icfg.fraction), int(icfg.samples),
            int(cfg.seed), cond, icfg.get("num_steps") or cfg.attack.num_steps, int(cfg.attack.batch_size),
            float(cfg.attack.cfg_scale) if model.is_text else 1.0)
        scores[name] = distance.numpy()
        truth = to_unit(subset.as_float()[:8])
        shown = truth * keep[:8] + 0.5 * (1 - keep[:8])
        examples[name] = [t for triple in zip(truth, shown, to_unit(best[:8])) for t in triple]
    result = roc_figures(scores["members"], scores["non_members"], int(cfg.seed))
    delta = float(icfg.delta)
    result.update({
        "reconstructed_members": float((scores["members"] <= delta).mean()),
        "reconstructed_non_members": float((scores["non_members"] <= delta).mean()),
        "member_distance_mean": float(scores["members"].mean()),
        "non_member_distance_mean": float(scores["non_members"].mean()),
        "region": str(icfg.region), "fraction": float(icfg.fraction), "samples": int(icfg.samples), "delta": delta,
    })
    rows = min(len(examples["members"]), len(examples["non_members"])) // 3
    if rows:
        tiles = [t for r in range(rows) for t in examples["members"][3 * r:3 * r + 3] + examples["non_members"][3 * r:3 * r + 3]]
        stem, _ = rundir.free_stem(out, "reconstruction", (".png",))
        save_grid(torch.stack(tiles), out / f"{stem}.png", nrow=6)
        result["picture"] = f"{stem}.png"
    return result


def _unsupported(model, method: str) -> str | None:
    """Why `model` has no such public method (a latent model has no `inpaint`), or None."""
    return getattr(model, "unsupported", {}).get(method)


REFERENCE_CANARY_KEY = 1 << 40  # seeding key of reference canary i: REFERENCE_CANARY_KEY + i (never an image index)


def _canaries(model: TrainedModel, members: ImageSet, cfg, generations: dict, delta: float,
              out_dir: Path | None = None) -> dict | None:
    """A run trained with dataset.duplicate kind=canary: per planted canary its exposure (loss attack at
    mia.timestep among the never-planted reference canaries), extraction (nearest generation within δ)
    and reconstruction error (the inpainting attack), by times planted, references as the null; with
    out_dir, canaries.png: per planted canary, the canary, its nearest generation, its best completion."""
    from ambient.attack.exposure import canary_figures
    from ambient.attack.reconstruction import reconstruction_scores
    from ambient.canaries import canary_caption, canary_label, canary_patterns, canary_plan, reference_ids

    dup = (model.settings.get("dataset") or {}).get("duplicate") or {}
    if dup.get("kind") != "canary" or members.canary is None or not cfg.get("canaries", {}).get("enabled", True):
        return None
    first = {}
    for row, c in enumerate(members.canary.tolist()):
        if c >= 0:
            first.setdefault(c, row)  # after dedup, the copy that was kept
    plan = [(c, m) for c, m in canary_plan(dup) if c in first]
    planted = members.select([first[c] for c, _ in plan])
    refs = reference_ids(dup)
    ref_x = canary_patterns(refs, int(dup.get("seed") or 0), members.channels, members.resolution).float() / 127.5 - 1
    ref_keys = [REFERENCE_CANARY_KEY + i for i in refs]
    if model.is_text:
        ref_cond = [canary_caption(i) for i in refs]
    else:
        classes = model.settings.get("num_classes") or 0
        ref_cond = torch.tensor([canary_label(i, classes) for i in refs]) if classes else None
    sets = ((planted.as_float(), planted.indices.tolist(), conditioning(model, planted)), (ref_x, ref_keys, ref_cond))
    m = cfg.mia
    probe = model.encode if isinstance(model, LatentModel) else (lambda x: x)  # the loss attack: in latent space
    loss = [loss_scores(model, probe(x), keys, m.timestep, m.draws, m.seed, cond).numpy() for x, keys, cond in sets]
    pool = ConcatSource(list(generations.values()))
    closest = [stream_nearest(to_unit(x), pool) for x, _, _ in sets]  # a block of generations at a time
    nearest = [c.distance.numpy() for c in closest]
    icfg, recon, completions = cfg.attack.get("inpaint"), [None, None], None
    if icfg is not None and icfg.enabled and not _unsupported(model, "inpaint"):
        runs = [reconstruction_scores(model, x, keys, icfg.region, float(icfg.fraction), int(icfg.samples),
                                      int(cfg.seed), cond, icfg.get("num_steps") or cfg.attack.num_steps,
                                      int(cfg.attack.batch_size), float(cfg.attack.cfg_scale) if model.is_text else 1.0)
                for x, keys, cond in sets]
        recon, completions = [r[0].numpy() for r in runs], runs[0][2]
    out = canary_figures([t for _, t in plan], loss[0], loss[1], nearest[0], nearest[1], recon[0], recon[1], delta)
    for entry, (c, _), index in zip(out["per_canary"], plan, planted.indices.tolist()):
        entry.update(canary=c, index=index)
    out.update(timestep=int(m.timestep), draws=int(m.draws))
    if out_dir is not None and len(plan):
        tiles = [to_unit(planted.as_float()), rows_of(pool, closest[0].index.tolist())]
        tiles += [] if completions is None else [to_unit(completions)]
        stem, _ = rundir.free_stem(out_dir, "canaries", (".png",))
        save_grid(torch.stack([t for row in zip(*tiles) for t in row]), out_dir / f"{stem}.png", nrow=len(tiles))
        out["picture"] = f"{stem}.png"
    return out


def _semantic(model: TrainedModel, members: ImageSet, generations: dict, prompts: dict) -> dict | None:
    """Classifier figures (attack/semantic.py) on a labelled dataset: the classifier learns from every
    image of the dataset the model never trained on (the `limit` lifted), or from all of them, members
    included, when fewer than MIN_TRAIN are left (noted in the report)."""
    dataset = dict(model.settings["dataset"], limit=None, duplicate=None)
    try:
        data = load_dataset(OmegaConf.create(dataset))
    except Exception:  # noqa: BLE001  a figure, not a reason to lose the report
        return None
    if data.labels is None or data.num_classes < 2:
        return None
    seen = set(members.indices.tolist())
    unseen = [r for r, i in enumerate(data.indices.tolist()) if i not in seen]
    source = "non-members"
    if len(unseen) < MIN_TRAIN:
        unseen, source = list(range(len(data))), "all images (members included: too few non-members)"
    real = data.select(unseen)
    labels = [prompts[name] for name in generations for _ in range(len(generations[name]))]
    gen_labels = torch.tensor(labels) if all(isinstance(v, int) for v in labels) else None
    result = semantic_quality(ConcatSource(list(generations.values())), to_unit(real.as_float()), real.labels,
                              data.num_classes, gen_labels)
    if result is not None:
        result["real_images"] = source
    return result


def rebuild_training_set(run_dir: Path, settings: dict) -> tuple[ImageSet, ImageSet, dict | None]:
    """The run's members and held-out images, exactly as trained (dataset settings + split.json).

    split.json lists the indices left after dedup, so the members are the deduplicated set; the
    third value maps each kept image to the duplicates dedup removed (None without dedup).
    """
    data = load_dataset(OmegaConf.create(settings["dataset"]))
    run = rundir.RunDir(run_dir)
    changed = dataset_change(run.read_images(), data.identities(), run_dir,
                             f"restore it (see {run.images}) to evaluate this run")
    if changed:  # attacking with other images than the members would give wrong figures, silently
        raise ValueError(changed)
    split = rundir.RunDir(run_dir).read_split()
    row_of = {int(index): row for row, index in enumerate(data.indices.tolist())}
    members = data.select([row_of[i] for i in split["members"]])
    holdout = data.select([row_of[i] for i in split["holdout"]])
    return members, holdout, _dedup_copies(Path(run_dir), settings.get("dedup"))


def _dedup_copies(run_dir: Path, dedup: dict | None) -> dict[int, list[int]] | None:
    """Kept index -> every original duplicate it stands for, from the run's dedup report."""
    if not dedup or dedup.get("method", "none") == "none" or not dedup.get("groups_file"):
        return None
    report = run_dir / dedup["groups_file"]
    if not report.is_file():
        raise FileNotFoundError(f"{report}: the run was deduplicated but its dedup report is missing")
    return duplicate_map(rundir.read_json(report))


def lowpass_sigma(value, settings: dict | None) -> float:
    """attack.lowpass as a number: `auto` is 1 px for a run trained on noisy data (corruption=noise),
    whose generations may carry noise over a copied image, else 0 (off)."""
    if value != "auto":
        return float(value)
    corruption = (settings or {}).get("corruption") or {}
    return 1.0 if isinstance(corruption, dict) and corruption.get("kind") == "noise" else 0.0


def _device(cfg, shard: Shard) -> str:
    if shard.world > 1 and shard.device:
        return shard.device  # each rank its own GPU (or the CPU)
    return cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_run(run_dir: Path, cfg, out: Path, shard: Shard | None = None) -> Path | None:
    """Attack a train.py run: its EMA model against its own members (and held-out non-members).
    cfg.checkpoint = STEP attacks the EMA model of that checkpoint instead (ambient/snapshots.py).
    Several ranks (shard) share the generation; the main rank alone attacks and reports (the others
    return None)."""
    shard = shard or Shard()
    device = _device(cfg, shard)
    step = cfg.get("checkpoint")
    model_dir = rundir.ModelDir.of(run_dir if step is None else _snapshot(run_dir, int(step), shard))
    latent = bool(model_dir.read_settings().get("latent"))
    # A latent fine-tune: generations decoded by its VAE, membership probed in latent space (ambient/latent_model.py).
    model = LatentModel.from_run(run_dir, device) if latent else load_run(model_dir.path, device)
    members, holdout, copies = rebuild_training_set(run_dir, model.settings)
    prompts = prompts_of(model, cfg.attack.prompts, members.prompts)
    phase = Phases()
    with phase("generation", f"{len(prompts)} prompts x {cfg.attack.samples_per_prompt}"):
        generations = generate_resumable(model, prompts, cfg, out, model_id=model_dir.fingerprint(), shard=shard)
    if generations is None:
        return None
    train = TrainingImages(to_unit(members.as_float()), members.indices.tolist(), members.paths, copies)
    with phase("extraction", f"{len(members)} training images, with the null reference"):
        if cfg.get("reference_data"):
            reference, source = _reference_folder(cfg, members.resolution, members.channels, generations)
        else:
            reference, source = null_reference(holdout, prompts, generations, int(cfg.seed))
        report, pairs = run_attack(generations, train, cfg.attack, device, reference, source,
                                   lowpass_sigma(cfg.attack.get("lowpass", "auto"), model.settings))
    real = members if members.canary is None else members.select((members.canary < 0).nonzero().flatten())
    # The probes see what the model was trained on: a latent model's members and held-out images as latents.
    probe_real, probe_holdout = real, holdout
    with phase("membership", f"{list(cfg.mia.attacks)} on {len(real)} members + {len(holdout)} held-out"):
        if latent and cfg.mia.enabled and len(holdout):  # else no membership attack runs
            probe_real, probe_holdout = model.encode_set(real), model.encode_set(holdout)
        rows = ScoredRows.of(real, holdout)  # classes and copies: the same rows as the probes
        report["mia"] = loss_attack(model, probe_real, probe_holdout, cfg.mia, rows)  # canaries: own section
        report.update(stronger_membership(model, probe_real, probe_holdout, cfg.mia, rows))
    with phase("reconstruction", f"up to {cfg.attack.inpaint.max_images} members and held-out each"):
        report["reconstruction"] = _reconstruction(model, real, holdout, cfg, out)
    with phase("canaries"):
        report["canaries"] = _canaries(model, members, cfg, generations, float(report["extraction"]["delta"]), out)
    if report.get("verdict"):
        report["verdict"]["text"] += _leakage(report)
    with phase("quality", "semantic classifier"):
        report["semantic"] = _semantic(model, members, generations, prompts)
    report["source"] = {"run_dir": str(run_dir), "date": _now(),
                        "settings": {k: model.settings.get(k) for k in ("objective", "corruption", "delta", "dedup", "privacy",
                                                                        "latent")},
                        "checkpoint_step": model.settings.get("checkpoint_step"),  # None: the final model
                        "train_steps": model.settings.get("train_steps"),
                        "seconds": phase.seconds | {"total": phase.total()}}  # wall time per phase of this call
    path = _write_and_log(report, pairs, cfg, out)
    # The card lists every evaluation; a checkpoint's lists its own, not the final model's under the run.
    write_model_card(model_dir.path, run_dir=run_dir if step is None else None, new_report=(report, path))
    return path


class Phases:
    """Wall seconds per phase of an evaluation (report source.seconds), each phase announced in the log:
    the attacks after generation run for minutes on a CPU with no other sign of life."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str, what: str = ""):
        log.info("evaluate: %s%s", name, f" ({what})" if what else "")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 1)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def _snapshot(run_dir: Path, step: int, shard: Shard) -> Path:
    """The checkpoint's model folder: the main rank exports it, the others wait for it."""
    from ambient.snapshots import export_snapshot, snapshot_dir

    if shard.main:
        path = export_snapshot(run_dir, step)
    shard.barrier()
    return path if shard.main else snapshot_dir(run_dir, step)


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def evaluate_folders(samples: Path, train_data: Path, cfg, out: Path) -> Path:
    """Attack a folder of generations (one sub-folder per prompt, or flat) against training images."""
    sub = sorted(p for p in samples.iterdir() if p.is_dir())
    resolution = cfg.resolution or _first_image_size(samples)
    groups = {p.name: p for p in sub} if sub else {"all": samples}
    generations = {name: to_unit(load_imagefolder(str(p), resolution, cfg.channels, skip_key=None).as_float())
                   for name, p in groups.items()}
    train_set = load_imagefolder(str(train_data), resolution, cfg.channels, skip_key=None)
    train = TrainingImages(to_unit(train_set.as_float()), train_set.indices.tolist(), train_set.paths)
    reference, source = (_reference_folder(cfg, resolution, cfg.channels, generations) if cfg.get("reference_data")
                         else (None, ""))
    report, pairs = run_attack(generations, train, cfg.attack, cfg.device if cfg.device != "auto" else "cpu",
                               reference, source, lowpass_sigma(cfg.attack.get("lowpass", "auto"), None))
    report["mia"] = None
    report["reconstruction"] = None
    report["source"] = {"samples": str(samples), "train_data": str(train_data), "date": _now()}
    return _write_and_log(report, pairs, cfg, out)


def evaluate_model(path: Path, train_data: Path, cfg, out: Path, shard: Shard | None = None) -> Path | None:
    """Attack a diffusers model this project did not train (ambient/external.py) with its training
    images (train_data) and, for the null, the membership and the reconstruction attacks, images
    it never saw (reference_data)."""
    from ambient.external import fingerprint, load_external, read_prompts

    shard = shard or Shard()
    device = _device(cfg, shard)
    model = load_external(path, cfg.model_sampler, cfg.attack.num_steps, device)
    if model.is_text and not cfg.get("prompts"):
        raise ConfigError(f"prompts=None is invalid: {path} is a text-to-image pipeline; pass prompts=FILE "
                          "(one caption per line)")
    size = (model.settings["channels"], model.settings["resolution"])
    members = _images_for_model("train_data", train_data, size, cfg.get("resolution"), model.is_text)
    holdout = (_images_for_model("reference_data", Path(cfg.reference_data), size, cfg.get("resolution"),
                                 model.is_text) if cfg.get("reference_data") else None)
    prompts = prompts_of(model, cfg.attack.prompts, read_prompts(cfg.prompts) if model.is_text else None)
    generations = generate_resumable(model, prompts, cfg, out, model_id=fingerprint(path), shard=shard)
    if generations is None:
        return None
    train = TrainingImages(to_unit(members.as_float()), members.indices.tolist(), members.paths)
    reference, source = (null_reference(holdout, prompts, generations, int(cfg.seed),
                                        f"images of reference_data={cfg.reference_data}")
                         if holdout is not None else (None, ""))
    report, pairs = run_attack(generations, train, cfg.attack, device, reference, source,
                               lowpass_sigma(cfg.attack.get("lowpass", "auto"), None))
    # Pooled only: two folders' class indices (train_data, reference_data) need not name the same classes.
    report["mia"] = loss_attack(model, members, holdout, cfg.mia) if holdout is not None else None
    report["reconstruction"] = _reconstruction(model, members, holdout, cfg, out) if holdout is not None else None
    if report.get("verdict"):
        report["verdict"]["text"] += _leakage(report)
    report["source"] = {"model": str(path), "train_data": str(train_data), "date": _now(),
                        "settings": {"external": model.settings["external"], "sampler": model.settings["sampler"],
                                     "prediction_type": model.settings["prediction_type"]}}
    return _write_and_log(report, pairs, cfg, out)


def _images_for_model(key: str, folder: Path, size: tuple[int, int], resolution: int | None, text: bool) -> ImageSet:
    """An image folder at the model's size and channels: other sizes only when resolution= asks to
    resize them (then it must be the model's), other channel counts never (a silent conversion would
    compare what the model never generated). Text models: captions from metadata.jsonl, else ""."""
    channels, model_resolution = size
    first = next((p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES),
                 None)
    if first is None:
        raise ConfigError(f"{key}={folder} is invalid: it holds no images")
    with Image.open(first) as img:
        bands, (w, h) = len(img.getbands()) - ("A" in img.getbands()), img.size
    if bands != channels:
        raise ConfigError(f"{key}={folder} is invalid: its images have {bands} channel(s) ({first.name}); the "
                          f"model generates {channels}")
    if resolution is not None and int(resolution) != model_resolution:
        raise ConfigError(f"resolution={resolution} is invalid: the model generates {model_resolution}x{model_resolution}"
                          f" images; set resolution={model_resolution} (or leave it unset)")
    if (w, h) != (model_resolution, model_resolution) and resolution is None:
        raise ConfigError(f"{key}={folder} is invalid: its images are {w}x{h} ({first.name}); the model generates "
                          f"{model_resolution}x{model_resolution}. Resize them, or pass resolution={model_resolution} "
                          "to center-crop and resize them on loading")
    images = load_imagefolder(str(folder), model_resolution, channels, skip_key=None)
    if text and images.prompts is None:
        images.prompts = [""] * len(images)
    return images


def _leakage(report: dict) -> str:
    """The verdict's second half: membership and reconstruction, whose null is AUC = 0.5."""
    said = []
    for section, name in (("mia", "membership inference (loss attack)"),
                          ("mia_multi_t", "the loss attack at the t chosen on a calibration split"),
                          ("secmi", "SecMI"), ("pia", "PIA"), ("reconstruction", "the reconstruction attack")):
        body = report.get(section) or {}
        # Within each class where the data has classes: the pooled AUC also measures how the split shared them.
        key = "stratified_auc" if body.get("stratified_auc_ci_low") is not None else "auc"
        if body.get(f"{key}_ci_low") is None:
            continue
        low, high = body[f"{key}_ci_low"], body[f"{key}_ci_high"]
        ci = (f"{'within-class ' if key != 'auc' else ''}AUC {body[key]:.3g}, 95% CI [{low:.3g}, {high:.3g}]"
              + (f"; pooled {body['auc']:.3g}" if key != "auc" else ""))
        said.append(f"{name} still separates members from unseen images ({ci})" if low > 0.5 else
                    f"{name} scores members as less likely members than unseen images ({ci}): the two sides of "
                    "the split differ, which is not membership" if high < 0.5 else f"{name} is at chance ({ci})")
    canaries = report.get("canaries") or {}
    if canaries.get("planted"):
        by_m = sorted((int(k.removeprefix("exposure_m")), v) for k, v in canaries.items() if k.startswith("exposure_m"))
        said.append("canaries planted " + ", ".join(f"{m}× reach an exposure of {v:.2g} bits" for m, v in by_m)
                    + f" (never-planted references: {canaries['reference_exposure']:.2g}; at most "
                    f"{canaries['max_exposure']:.2g})")
    return (" Beyond copying: " + "; ".join(said) + ".") if said else ""


def null_reference(holdout: ImageSet, prompts: dict, generations: dict, seed: int,
                   origin: str = "held-out images of the run (split.json)") -> tuple[dict[str, torch.Tensor] | None, str]:
    """Held-out real images as a generator that never saw the training set: as many as the
    generations (a seeded subset), grouped like them (by class for class prompts), in [0, 1]."""
    if len(holdout) == 0:
        return None, ""
    wanted = sum(len(g) for g in generations.values())
    order = torch.randperm(len(holdout), generator=seeded_generator(seed, 0, Stream.NULL)).tolist()
    images = to_unit(holdout.as_float())
    by_label = all(isinstance(p, int) for p in prompts.values()) and holdout.labels is not None
    groups: dict[str, list[int]] = {}
    for row in order:
        if by_label:
            label = int(holdout.labels[row])
            names = [n for n, p in prompts.items() if p == label]
            if not names or len(groups.get(names[0], [])) >= len(generations[names[0]]):
                continue
            groups.setdefault(names[0], []).append(row)
        elif sum(map(len, groups.values())) < wanted:
            groups.setdefault("reference", []).append(row)
    reference = {name: images[rows] for name, rows in groups.items()}
    count = sum(len(r) for r in groups.values())
    source = (f"{count} {origin}, for {wanted} generations"
              + ("" if count >= wanted else ": fewer than the generations, so the null undercounts; train with a "
                 "larger dataset.holdout") + (", grouped by class" if by_label else ""))
    return reference, source


def _reference_folder(cfg, resolution: int, channels: int, generations: dict) -> tuple[dict, str]:
    folder = load_imagefolder(str(cfg.reference_data), resolution, channels, skip_key=None)
    wanted = sum(len(g) for g in generations.values())
    order = torch.randperm(len(folder), generator=seeded_generator(int(cfg.seed), 1, Stream.NULL))[:wanted]
    images = to_unit(folder.as_float())[order]
    return {"reference": images}, f"{len(images)} images of reference_data={cfg.reference_data}, for {wanted} generations"


def _write_and_log(report: dict, pairs: list, cfg, out: Path) -> Path:
    path = write_report(report, pairs, cfg, out)
    if cfg.logger.kind != "none":
        tracker = make_tracker(cfg.logger, out, OmegaConf.to_container(cfg, resolve=True))
        try:
            tracker.log(schema.flatten(report), step=0)
            if (out / report["picture"]).is_file():
                tracker.log_image("extracted", out / report["picture"], step=0)
        finally:
            tracker.finish()
    return path


def _first_image_size(folder: Path) -> int:
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as img:
                return min(img.size)
    raise FileNotFoundError(f"samples={folder} holds no images")
