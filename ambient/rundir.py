"""The run directory: every file name a run has, typed read/write helpers, and "never overwrite".

train.py, evaluate.py, `python -m ambient.compare` and `python -m ambient.defenses.dedup` read and
write runs only through this module, so a file's name and format live in one place:

    config.yaml         resolved train config            split.json     member / holdout indices
    images.json         index -> [path, pixel hash]
    summary.json        steps, final loss, seconds       metrics.jsonl  one JSON line per log step
    samples.png         the final sample grid            failed.json    why a job failed
    dedup.json/.png     the dedup report                 checkpoints/   checkpoint-NNNNNNN/ (accelerate)
    caption_embeddings.safetensors                       eval/          report.json, report.md, samples/
    model/            an AmbientPipeline (diffusers): model_index.json (its "ambient" key: what
                      sampling needs), pipeline_ambient.py, unet/, scheduler/, text_encoder/,
                      tokenizer/, README.md (model card), caption_embeddings.safetensors,
                      pipeline/ (unmasked IF fine-tunes: the source pipeline with the new UNet)
    (runs saved before the pipeline format keep their settings in model/ambient.json)
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import traceback
from pathlib import Path

from ambient.errors import RunRefused

CONFIG = "config.yaml"
SPLIT = "split.json"
IMAGES = "images.json"     # stable index -> [path, pixel hash] of the dataset the run was trained on
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.png"
FAILED = "failed.json"
CHECKPOINTS = "checkpoints"
CAPTIONS = "caption_embeddings.safetensors"
LATENTS = "latents.safetensors"  # latent pipelines: every training image's VAE latents, encoded once (ambient/latents.py)
DEDUP = "dedup"            # dedup.json, dedup.png (dedup-1.* beside an existing different one)
DEDUP_THRESHOLD = "_threshold.png"  # dedup_threshold.png: the calibrated threshold's two distributions
EVAL = "eval"              # evaluate.py's default out_dir inside a run
REPORT = "report"          # report.json / report.md inside an eval folder
GENERATIONS = "samples"    # <eval>/samples/<prompt>/NNNNNN.png, reused by a rerun
GENERATIONS_META = "meta.json"  # <eval>/samples/meta.json: the sampling settings they were made with
MODEL = "model"
MODEL_TMP = "model.tmp"    # the final model is written here, then renamed to model/ in one step
LOCK = ".lock"             # held by the process that trains in this run directory
SETTINGS = "ambient.json"  # inside model/ of runs saved before the pipeline format
INDEX = "model_index.json"  # inside model/: the diffusers pipeline index, its "ambient" key the settings
PIPELINE_MODULE = "pipeline_ambient"  # model/pipeline_ambient.py: lets DiffusionPipeline find the class
CARD = "README.md"         # inside model/: the model card
EVALUATIONS = "evaluations.jsonl"  # inside model/: each evaluation's headline figures, appended (the card's history)
UNET = "unet"
SCHEDULER = "scheduler"
PIPELINE = "pipeline"
HYDRA = ".hydra"
# A run's internals: never runs themselves (compare walks past them).
SNAPSHOTS = "snapshots"     # earlier checkpoints exported as model folders (ambient/snapshots.py)
STEP_EVAL = EVAL + "-step-"  # evaluate.py checkpoint=STEP: <run>/eval-step-STEP, not the final model's
INTERNAL_DIRS = {HYDRA, ".submitit", CHECKPOINTS, MODEL, MODEL_TMP, SNAPSHOTS, "wandb"}


def write_json(path: Path, obj) -> Path:
    path = Path(path)
    path.write_text(json.dumps(obj, indent=2))
    return path


def read_json(path: Path) -> dict:
    """A JSON object from path; FileNotFoundError / ValueError name the file."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


def free_stem(directory: Path, stem: str, suffixes=(".json",), same_text: str | None = None) -> tuple[str, bool]:
    """The one "never overwrite" rule: `stem`, else `stem-1`, `stem-2`, ... — the first whose files
    (stem + each suffix) all do not exist. With same_text, an existing stem whose first file holds
    exactly that text is returned instead (the same result again, e.g. a resumed run): (stem, existed).
    """
    directory = Path(directory)
    for n in range(100_000):
        name = stem if n == 0 else f"{stem}-{n}"
        files = [directory / f"{name}{s}" for s in suffixes]
        if not any(f.exists() for f in files):
            return name, False
        if same_text is not None and files[0].is_file() and files[0].read_text() == same_text:
            return name, True
    raise FileExistsError(f"{directory} holds 100000 files named {stem}-N; choose another directory")


class RunDir:
    """A train.py run directory (it may not exist yet)."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name) -> Path:
        return self.path / name

    # --- file locations
    config = property(lambda self: self.path / CONFIG)
    split = property(lambda self: self.path / SPLIT)
    images = property(lambda self: self.path / IMAGES)
    summary = property(lambda self: self.path / SUMMARY)
    metrics = property(lambda self: self.path / METRICS)
    samples = property(lambda self: self.path / SAMPLES)
    failed = property(lambda self: self.path / FAILED)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    captions = property(lambda self: self.path / CAPTIONS)
    latents = property(lambda self: self.path / LATENTS)
    model = property(lambda self: self.path / MODEL)
    eval = property(lambda self: self.path / EVAL)

    def exists(self) -> bool:
        return self.path.is_dir()

    def is_run(self) -> bool:
        """A run train.py started (config written) or one that failed before that."""
        return self.config.is_file() or self.failed.is_file()

    def discard_if_only(self, names) -> bool:
        """Remove the directory when it holds nothing but `names` (what one launch wrote before it
        failed, e.g. Hydra's record and log after a config typo); True when removed. A directory with
        anything else in it — a run, a user's files — is left as it is."""
        if not self.path.is_dir() or {p.name for p in self.path.iterdir()} - set(names):
            return False
        shutil.rmtree(self.path)
        return True

    def is_finished(self) -> bool:
        """The one definition: summary.json is written last, after the model (renamed into place
        complete) and the sample grid. A model without a summary is completed by resume=auto."""
        return self.summary.is_file()

    def has_model(self) -> bool:
        """A complete final model: model/ appears only by renaming a fully written model.tmp/
        (older runs wrote ambient.json last, so it marks theirs complete too)."""
        return ModelDir(self.model).is_model()

    @property
    def model_tmp(self) -> Path:
        return self.path / MODEL_TMP

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    # --- typed reads and writes
    def write_config(self, cfg) -> Path:
        from omegaconf import OmegaConf

        OmegaConf.save(cfg, self.config, resolve=True)
        return self.config

    def read_config(self) -> dict:
        """The resolved config (or Hydra's record of it); {} when neither is readable."""
        import yaml

        for path in (self.config, self.path / HYDRA / CONFIG):
            try:
                data = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(data, dict):
                return data
        return {}

    def write_split(self, members, holdout) -> Path:
        return write_json(self.split, {"members": [int(i) for i in members], "holdout": [int(i) for i in holdout]})

    def read_split(self) -> dict[str, list[int]]:
        split = read_json(self.split)
        return {"members": [int(i) for i in split["members"]], "holdout": [int(i) for i in split.get("holdout", [])]}

    def write_images(self, identities: dict) -> Path:
        return write_json(self.images, {"count": len(identities), "identities": identities})

    def read_images(self) -> dict | None:
        """The recorded identities, or None for runs made before they were recorded."""
        return read_json(self.images)["identities"] if self.images.is_file() else None

    def write_summary(self, summary: dict) -> Path:
        return write_json(self.summary, summary)

    def read_summary(self) -> dict:
        return read_json(self.summary)

    def record_failure(self, error: BaseException, overrides=()) -> Path | None:
        """failed.json (error, traceback, overrides). A refusal (RunRefused) records nothing: the
        directory belongs to another run, whose own failed.json must survive. Main rank only."""
        if self.is_finished() or isinstance(error, RunRefused):
            return None
        self.path.mkdir(parents=True, exist_ok=True)
        return write_json(self.failed, {
            "error": f"{type(error).__name__}: {error}",
            "type": type(error).__name__,
            "overrides": list(overrides),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "traceback": traceback.format_exception(type(error), error, error.__traceback__),
        })

    def eval_reports(self) -> list[Path]:
        """The final model's evaluations (an earlier checkpoint's are step_reports)."""
        return sorted(p for p in self.path.glob(f"{EVAL}*/{REPORT}*.json")
                      if p.is_file() and not p.parent.name.startswith(STEP_EVAL))

    def step_reports(self) -> list[Path]:
        """Evaluations of earlier checkpoints (evaluate.py checkpoint=STEP), in step order."""
        return sorted(p for p in self.path.glob(f"{STEP_EVAL}*/{REPORT}*.json") if p.is_file())

    def newest_report(self) -> Path | None:
        reports = self.eval_reports()
        return max(reports, key=lambda p: p.stat().st_mtime) if reports else None


class RunLock:
    """An exclusive lock on a run directory for a whole training run: a `.lock` file created
    atomically (O_EXCL) holding the owner's host, pid and SLURM job. Stale, and taken over: a lock
    of a dead process on this host, one holding this very pid (a restarted container), and one of
    the same SLURM job (a requeued job, maybe on another node). Another live holder, or one on
    another host that cannot be checked, is reported with how to clear it."""

    def __init__(self, run: RunDir):
        self.run, self.held = run, False

    @staticmethod
    def _owner() -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.run.lock.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(holder: dict) -> bool:
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job") == job:
            return False  # this job's earlier run, before a requeue
        if holder.get("host") != socket.gethostname():
            return True  # cannot tell from here: treat as alive
        if holder.get("pid") == os.getpid():
            return False  # pids restart in a new container with the same host name
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            return True
        return True

    def acquire(self) -> RunLock:
        self.run.path.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.run.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # being written this instant, or garbage: look again
                    time.sleep(0.1)
                    holder = self._holder()
                if holder is not None and self._alive(holder):
                    raise RunRefused(
                        f"run_dir={self.run.path} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                        f"(since {holder.get('time')}); wait for it, choose another run_dir, or delete "
                        f"{self.run.lock} if that process is gone") from None
                self.run.lock.unlink(missing_ok=True)  # stale: its owner is dead
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._owner()))
            self.held = True
            return self
        raise RunRefused(f"could not take the lock {self.run.lock}; delete it if no run is using {self.run.path}")

    def release(self) -> None:
        if self.held:
            self.run.lock.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class ModelDir:
    """`<run>/model`: the finished model (diffusers folders + ambient.json)."""

    def __init__(self, path):
        self.path = Path(path)

    unet = property(lambda self: self.path / UNET)
    scheduler = property(lambda self: self.path / SCHEDULER)
    settings = property(lambda self: self.path / SETTINGS)
    index = property(lambda self: self.path / INDEX)
    card = property(lambda self: self.path / CARD)
    captions = property(lambda self: self.path / CAPTIONS)
    pipeline = property(lambda self: self.path / PIPELINE)
    evaluations = property(lambda self: self.path / EVALUATIONS)

    def append_evaluation(self, record: dict) -> None:
        """One line per evaluation, never rewritten: the card keeps it even when the report's folder is
        outside the run or later deleted."""
        with self.evaluations.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read_evaluations(self) -> list[dict]:
        """The appended records; a line cut short by a kill is skipped."""
        if not self.evaluations.is_file():
            return []
        records = []
        for line in self.evaluations.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return [r for r in records if isinstance(r, dict) and "report" in r]

    @classmethod
    def of(cls, path) -> ModelDir:
        """A run directory's model folder, or a model folder itself."""
        path = Path(path)
        inner = cls(path / MODEL)
        return inner if inner.is_model() else cls(path)

    def is_model(self) -> bool:
        """An ambient model folder: a pipeline index holding ambient settings, or an older ambient.json."""
        if self.settings.is_file():
            return True
        try:
            return "ambient" in read_json(self.index)
        except (OSError, ValueError):
            return False

    def read_settings(self) -> dict:
        if self.index.is_file():
            settings = read_json(self.index).get("ambient")
            if settings:
                return settings
        if not self.settings.is_file():
            raise FileNotFoundError(f"{self.path} holds no finished ambient model (neither {INDEX} with ambient "
                                    f"settings nor {SETTINGS})")
        return read_json(self.settings)

    def fingerprint(self) -> str:
        """sha256 over the weights and settings: which model made a set of generations (a latent
        fine-tune's VAE, pipeline/vae, decodes them: it counts too)."""
        import hashlib

        digest = hashlib.sha256()
        settings = self.settings if self.settings.is_file() else self.index
        vae = (self.pipeline / "vae").rglob("*")  # nothing for pixel models
        for path in sorted(p for p in [settings, *self.unet.rglob("*"), *vae] if p.is_file()):
            digest.update(path.relative_to(self.path).as_posix().encode())
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()[:32]


def hydra_record_dir(output_dir) -> str:
    """Where Hydra writes its record (config, overrides) for this launch: `.hydra` for a run's first
    launch, `.hydra-1`, `.hydra-2`, ... for later ones (resumes, refusals), so a launch that is then
    refused never rewrites the record of the run it was refused for."""
    name, _ = free_stem(Path(output_dir), HYDRA, ("",))
    return name


def hydra_quoted(text: str) -> str:
    """text as a single-quoted Hydra value: Hydra unescapes only backslashes before a quote (and at
    the end), so only those are doubled; quotes get a backslash."""
    import re

    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"


def cli_override(key: str, value) -> str:
    """`key=value` as one shell word that Hydra parses back to exactly `value`: sweep run directories
    hold '=' and ',', which Hydra's override grammar only accepts inside quotes."""
    import re
    import shlex

    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_./:+@%-]+", text):
        return f"{key}={text}"
    quoted = hydra_quoted(text)
    if not re.search(r"[\"$`\\!']", text):
        return f'"{key}={quoted}"'  # the usual case, as a person would type it
    return shlex.quote(f"{key}={quoted}")


def eval_dir(run_dir, stamp: str | None = None, checkpoint=None) -> str:
    """conf/evaluate.yaml's default out_dir: <run_dir>/eval (<run_dir>/eval-step-STEP for an earlier
    checkpoint), else a fresh outputs/eval/<stamp> (the launch's stamp, shared by its ranks; default: the time)."""
    if run_dir:
        return str(Path(run_dir) / (f"{STEP_EVAL}{int(checkpoint):07d}" if checkpoint is not None else EVAL))
    return f"outputs/eval/{stamp}" if stamp else (time.strftime("outputs/eval/%Y-%m-%d/%H-%M-%S-")
                                                 + f"{time.time() % 1:.6f}"[2:])
