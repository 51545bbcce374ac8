"""Every attack metric in one import; each lives in its own module (one concept per module).

- cliques.py     clique filter on generations of one prompt (Carlini et al. 2023, Sec. 4.2)
- extraction.py  (l2, delta)-extraction, adaptive CIFAR-10 score, Gu et al. ratio, clique precision
- replication.py feature-space top-1 cosine similarity (Somepalli et al. 2023)
- quality.py     FID and KID between feature sets
- membership.py  ROC AUC and TPR at low FPR for membership inference
- exposure.py    canary exposure among never-planted references (Carlini et al. 2019)
- features.py    feature extractors (offline defaults, local-weights Inception)
"""

from ambient.attack.cliques import Clique, cliques_from_distances, find_cliques
from ambient.attack.extraction import (
    AdaptiveResult,
    CliquePrecision,
    Extraction,
    ExtractionResult,
    GuResult,
    adaptive_extraction,
    clique_precision,
    gu_ratio,
    verify_extraction,
)
from ambient.attack.exposure import canary_figures, exposure
from ambient.attack.features import (
    InceptionFeatures,
    RandomProjectionFeatures,
    extract_features,
    pixel_features,
)
from ambient.attack.membership import MIAResult, mia_metrics, tpr_at_fpr
from ambient.attack.quality import (
    feature_statistics,
    fid,
    fid_images,
    frechet_distance,
    kid,
    kid_images,
)
from ambient.attack.replication import ReplicationResult, feature_replication

__all__ = [
    "AdaptiveResult",
    "Clique",
    "CliquePrecision",
    "Extraction",
    "ExtractionResult",
    "GuResult",
    "InceptionFeatures",
    "MIAResult",
    "RandomProjectionFeatures",
    "ReplicationResult",
    "adaptive_extraction",
    "canary_figures",
    "clique_precision",
    "cliques_from_distances",
    "exposure",
    "extract_features",
    "feature_replication",
    "feature_statistics",
    "fid",
    "fid_images",
    "find_cliques",
    "frechet_distance",
    "gu_ratio",
    "kid",
    "kid_images",
    "mia_metrics",
    "pixel_features",
    "tpr_at_fpr",
    "verify_extraction",
]
