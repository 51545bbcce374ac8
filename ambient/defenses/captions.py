"""Caption-side training-time defenses against copying (Somepalli et al. 2023, "Understanding and
Mitigating Copying in Diffusion Models"): caption randomization (random word replacement, word
addition, shuffling) and Gaussian noise on the caption embeddings, plus an empty-caption mix that
is also classifier-free-guidance caption dropout.

Every random choice for a caption comes from a generator seeded by (seed, image id, stream, step),
so an image's caption at a step is the same whatever batch it lands in, on every rank and after a
resume, and differs from step to step.
"""
from __future__ import annotations

import math
import re

import torch

from ambient.config import CAPTION_RANDOMIZE, _check
from ambient.seeding import Stream, seeded_generator

WORD = re.compile(r"\w+(?:['’]\w+)*")  # keeps "don't" whole; punctuation is not a vocabulary word


class CaptionDefense:
    """Randomizes captions (text) and noises their embeddings, deterministically per (image, step).

    randomize: replace (each word -> a random vocabulary word with probability q), add (after each
    word a random vocabulary word is inserted with probability q), shuffle (with probability q the
    caption's words are permuted). empty_prob: the caption becomes "". embedding_noise: std of the
    Gaussian noise added to every token's embedding.
    """

    def __init__(self, vocabulary: list[str], randomize: str = "none", q: float = 0.0, empty_prob: float = 0.0,
                 embedding_noise: float = 0.0, seed: int = 0):
        _check(randomize in CAPTION_RANDOMIZE, "captions.randomize", randomize, " | ".join(CAPTION_RANDOMIZE))
        _check(_is_number(q) and 0 <= q <= 1, "captions.q", q, "a number in [0, 1]")
        # empty_prob = 1 would leave no caption to condition on (config.py rejects it likewise).
        _check(_is_number(empty_prob) and 0 <= empty_prob < 1, "captions.empty_prob", empty_prob,
               "a number in [0, 1)")
        _check(_is_number(embedding_noise) and 0 <= embedding_noise < math.inf, "captions.embedding_noise",
               embedding_noise, "a number in [0, inf)")
        self.vocabulary = list(vocabulary)
        self.randomize, self.q = randomize, float(q)
        self.empty_prob, self.embedding_noise = float(empty_prob), float(embedding_noise)
        self.seed = int(seed)
        _check(not (self.draws_words and not self.vocabulary), "captions.randomize", randomize,
               "none | shuffle when the captions have no words to draw from")

    @classmethod
    def from_config(cls, cfg, vocabulary: list[str], seed: int) -> CaptionDefense:
        """From a `captions` config node (DictConfig or dict); missing keys mean no defense."""
        get = (lambda key, default: default) if cfg is None else cfg.get
        return cls(vocabulary, randomize=get("randomize", "none"), q=get("q", 0.0),
                   empty_prob=get("empty_prob", 0.0), embedding_noise=get("embedding_noise", 0.0), seed=seed)

    @staticmethod
    def vocabulary_of(captions: list[str]) -> list[str]:
        """The sorted unique lowercase words of the captions (what replace/add draw from)."""
        return sorted({word for caption in captions for word in WORD.findall(caption.lower())})

    @property
    def draws_words(self) -> bool:
        return self.randomize in ("replace", "add") and self.q > 0

    @property
    def active(self) -> bool:
        randomizes = self.randomize != "none" and self.q > 0
        return randomizes or self.empty_prob > 0 or self.embedding_noise > 0

    def apply_text(self, captions: list[str], rows, step: int) -> list[str]:
        """Each caption randomized and possibly emptied; rows are the images' stable ids."""
        ids = _ids(rows, len(captions))
        if self.empty_prob == 0 and (self.randomize == "none" or self.q == 0):
            return list(captions)
        return [self._caption(caption, seeded_generator(self.seed, row, Stream.CAPTION_TEXT, step))
                for caption, row in zip(captions, ids)]

    def apply_embeddings(self, embeddings: torch.Tensor, rows, step: int) -> torch.Tensor:
        """(B, L, D) embeddings plus N(0, embedding_noise²) noise drawn per (image, step)."""
        if self.embedding_noise == 0:
            return embeddings
        ids = _ids(rows, embeddings.shape[0])
        # Drawn on the CPU so the noise does not depend on the device either.
        noise = torch.stack([torch.randn(tuple(embeddings.shape[1:]),
                                         generator=seeded_generator(self.seed, row, Stream.CAPTION_NOISE, step))
                             for row in ids])
        return embeddings + self.embedding_noise * noise.to(embeddings.device, embeddings.dtype)

    def _caption(self, caption: str, gen: torch.Generator) -> str:
        # The empty-caption draw comes first so whether a caption is dropped does not depend on
        # the randomization settings (the result is "" either way, as if applied after it).
        if float(torch.rand((), generator=gen)) < self.empty_prob:
            return ""
        words = caption.split()
        if self.randomize == "none" or self.q == 0 or not words:
            return caption
        if self.randomize == "shuffle":
            if float(torch.rand((), generator=gen)) >= self.q:
                return caption
            return " ".join(words[i] for i in torch.randperm(len(words), generator=gen).tolist())
        chosen = (torch.rand(len(words), generator=gen) < self.q).tolist()
        if not any(chosen):
            return caption
        picks = [self.vocabulary[i] for i in torch.randint(len(self.vocabulary), (len(words),), generator=gen).tolist()]
        if self.randomize == "replace":
            return " ".join(pick if hit else word for word, pick, hit in zip(words, picks, chosen))
        return " ".join(w for word, pick, hit in zip(words, picks, chosen) for w in ((word, pick) if hit else (word,)))


def caption_label(cfg: dict) -> str:
    """How the comparison table names a `captions` node's defenses ("" for none; CFG's default 10%
    empty captions is no defense)."""
    parts = []
    if cfg.get("randomize", "none") != "none" and cfg.get("q", 0):
        parts.append(f"caption {cfg['randomize']} q={cfg['q']:g}")
    if cfg.get("embedding_noise", 0):
        parts.append(f"caption noise sigma={cfg['embedding_noise']:g}")
    if cfg.get("empty_prob", 0) > 0.1:
        parts.append(f"empty captions {cfg['empty_prob']:g}")
    return " + ".join(parts)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _ids(rows, count: int) -> list[int]:
    ids = [int(r) for r in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
    if len(ids) != count:
        raise ValueError(f"{len(ids)} row ids for {count} captions")
    return ids
