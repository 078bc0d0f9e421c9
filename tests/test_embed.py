"""Prompt embedders: the real MiniLM model ranks paraphrases above unrelated prompts; CLIP uses the checkpoint."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from nirvana.embed import (
    CHECKPOINT_SETTINGS,
    ClipEmbedder,
    EmbedderError,
    clip_pool,
    embedder_dim,
    make_embedder,
    resolve_embedder,
)


def test_minilm_paraphrase_is_closer_than_unrelated() -> None:
    emb = make_embedder("minilm")
    v = emb.embed(["a red fox in the snow, photograph", "photo of a red fox in snow", "a bowl of ramen"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.9 > 0.3 > v[0] @ v[2]
    np.testing.assert_allclose(emb.embed_one("photo of a red fox in snow"), v[1], atol=1e-5)  # batch-independent


def test_clip_embedder_uses_checkpoint_text_encoder(tiny_checkpoint) -> None:
    emb = make_embedder("clip", tiny_checkpoint)
    v = emb.embed(["a red fox", "a red fox", "a blue car"])
    assert v.shape == (3, tiny_checkpoint.text_hidden_size)
    assert v[0] @ v[1] == pytest.approx(1.0, abs=1e-5)


def test_unknown_or_unbuildable_embedder() -> None:
    with pytest.raises(EmbedderError, match="embedder='nope'"):
        make_embedder("nope")
    with pytest.raises(EmbedderError, match="needs a checkpoint"):
        make_embedder("clip")


def test_clip_pooled_from_a_separate_encoder_equals_the_torch_embedder(tiny_checkpoint) -> None:
    prompts = ["a red fox", "a small red circle in the top left on a white background", ""]
    expected = make_embedder("clip", tiny_checkpoint).embed(prompts)
    encoder = tiny_checkpoint.text_encoder
    separate = ClipEmbedder(tiny_checkpoint, encode_text=lambda ids: encoder(ids).last_hidden_state)
    np.testing.assert_allclose(separate.embed(prompts), expected, atol=1e-6)


@pytest.mark.parametrize("eos_token_id", [2, 7])  # 2: SD 1.5's legacy config (pool at the highest id)
def test_clip_pool_matches_the_text_models_pooled_output(eos_token_id: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=10,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    model = CLIPTextModel(config).eval()
    ids = torch.tensor([[0, 3, 4, 9, 7, 7], [0, 5, 7, 7, 7, 7]])  # legacy: the 9 is the "highest id" position
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(clip_pool(out.last_hidden_state, ids, eos_token_id), out.pooler_output)


def test_clip_from_the_conditioning_pass_equals_the_embedder(tiny_checkpoint) -> None:
    from nirvana.denoise import tokenize_prompts
    from nirvana.runtime.torch_runtime import TorchSubModels

    clip = make_embedder("clip", tiny_checkpoint)
    for prompt in ["a red fox", "a small red circle in the top left on a white background", "x " * 100]:
        tokens = tokenize_prompts(tiny_checkpoint.tokenizer, prompt, "blurry")
        hidden = TorchSubModels(tiny_checkpoint).encode_text(tokens.input_ids)  # [uncond, cond] in one batch
        pooled = clip.embed_from_hidden(hidden[1:], tokens.input_ids[1:])
        np.testing.assert_allclose(pooled, clip.embed([prompt]), atol=1e-6)


def test_minilm_cannot_pool_from_the_text_encoder() -> None:
    assert make_embedder("minilm").embed_from_hidden(torch.zeros(1, 77, 32), torch.zeros(1, 77)) is None


def test_auto_is_the_checkpoints_own_encoder_unless_its_maker_recorded_another(tiny_checkpoint, tmp_path) -> None:
    # make-tiny-model records MiniLM: a random-weight text encoder's features mean nothing.
    assert json.loads((tiny_checkpoint.path / CHECKPOINT_SETTINGS).read_text())["embedder"] == "minilm"
    assert resolve_embedder("auto", tiny_checkpoint) == "minilm"
    assert embedder_dim("auto", tiny_checkpoint) == 384
    assert resolve_embedder("clip", tiny_checkpoint) == "clip"  # a named embedder is taken as named
    unrecorded = dataclasses.replace(tiny_checkpoint, path=tmp_path)  # a checkpoint folder without nirvana.json
    assert resolve_embedder("auto", unrecorded) == "clip"
    assert embedder_dim("auto", unrecorded) == tiny_checkpoint.text_hidden_size
    (tmp_path / CHECKPOINT_SETTINGS).write_text('{"embedder": "e5"}')
    with pytest.raises(EmbedderError, match="embedder='e5' is unknown"):
        resolve_embedder("auto", unrecorded)
    (tmp_path / CHECKPOINT_SETTINGS).write_text("[1, 2")
    with pytest.raises(EmbedderError, match="cannot be read"):
        resolve_embedder("auto", unrecorded)
    with pytest.raises(EmbedderError, match="embedder='auto' needs the checkpoint"):
        make_embedder("auto")
