"""The project's own errors: a bad setting, and a run directory train.py will not touch."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what is allowed."""


class RunRefused(ConfigError):
    """train.py will not touch this run directory (finished, in use, or trained with another config):
    nothing was written, and no failed.json is recorded for it (that directory belongs to another run)."""


class Interrupted(KeyboardInterrupt):
    """Training was stopped by SIGTERM (e.g. SLURM preemption) or Ctrl-C after saving a checkpoint:
    `resume=auto` continues it. A KeyboardInterrupt, so a Hydra sweep stops too instead of
    starting its next job."""
