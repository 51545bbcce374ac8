"""The training-data extraction attack (Carlini et al. 2023) and its metrics; see metrics.py."""

from ambient.attack.metrics import *
from ambient.attack.metrics import __all__  # noqa: F401
