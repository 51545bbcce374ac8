"""Caption conditioning for training: each batch's captions, through the caption-side defenses, as
embeddings from a cache that holds every training caption (encoded once, saved with the run).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ambient.captions import CaptionDefense
from ambient.data import ImageSet
from ambient.sampling import CAPTIONS_FILE
from ambient.text import CaptionEmbeddings, build_text_encoder


class TextConditioning:
    """rows of the member set at a step -> (B, L, D) caption embeddings, defended as configured."""

    def __init__(self, members: ImageSet, embeddings: CaptionEmbeddings, defense: CaptionDefense):
        self.captions, self.indices = list(members.prompts), members.indices
        self.embeddings, self.defense = embeddings, defense

    def __call__(self, rows: torch.Tensor, step: int) -> torch.Tensor:
        ids = self.indices[rows]  # stable image indices: the defenses' draws follow the image, not its batch
        captions = self.defense.apply_text([self.captions[int(r)] for r in rows], ids, step)
        return self.defense.apply_embeddings(self.embeddings(captions), ids, step)


def build_text_conditioning(cfg, members: ImageSet, cache_dir: Path | None) -> TextConditioning:
    """The encoder of `text_encoder`, the defenses of `captions`, and the embeddings of every member
    caption plus the empty one (read from cache_dir when an earlier start of this run wrote them)."""
    if members.prompts is None:
        raise ValueError(f"text_encoder={cfg.text_encoder.kind} needs captions, and dataset={cfg.dataset.kind} has "
                         "none (imagefolder: a metadata.jsonl with a text column)")
    embeddings = CaptionEmbeddings(build_text_encoder(cfg.text_encoder))
    cache = None if cache_dir is None else Path(cache_dir) / CAPTIONS_FILE
    if cache is not None and cache.is_file():
        embeddings.load(cache)
    embeddings(sorted(set(members.prompts)) + [""])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        embeddings.save(cache)
    defense = CaptionDefense.from_config(cfg.captions, CaptionDefense.vocabulary_of(members.prompts), int(cfg.seed))
    return TextConditioning(members, embeddings, defense)
