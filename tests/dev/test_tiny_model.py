"""nirvana_dev.tiny_model: the tiny checkpoint is deterministic and its tokenizer behaves like CLIP's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoTokenizer, CLIPTokenizer

from nirvana.checkpoint import Checkpoint, fingerprint_checkpoint
from nirvana_dev.tiny_model import _TINY_MERGES, _TINY_TEXT, build_clip_tokenizer, make_tiny_model


def test_make_tiny_model_is_deterministic(tmp_path: Path, tiny_checkpoint_dir: Path) -> None:
    same = make_tiny_model(tmp_path / "same", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert fingerprint_checkpoint(same) == fingerprint_checkpoint(tiny_checkpoint_dir)
    assert fingerprint_checkpoint(other) != fingerprint_checkpoint(tiny_checkpoint_dir)


def test_tokenizer_merges_do_not_depend_on_the_run(tmp_path: Path, tiny_checkpoint_dir: Path) -> None:
    # tokenizers' own end-of-word handling breaks count ties in hash-map order: most pairs of a small corpus tie.
    expected = (tiny_checkpoint_dir / "tokenizer" / "merges.txt").read_text()
    for run in range(3):
        build_clip_tokenizer(tmp_path / str(run), _TINY_TEXT.split(), _TINY_MERGES)
        assert (tmp_path / str(run) / "tokenizer" / "merges.txt").read_text() == expected


def test_tokenizer_has_clips_vocabulary_layout(tiny_checkpoint: Checkpoint, tiny_checkpoint_dir: Path) -> None:
    tok = tiny_checkpoint.tokenizer
    vocab = json.loads((tiny_checkpoint_dir / "tokenizer" / "vocab.json").read_text())
    merges = (tiny_checkpoint_dir / "tokenizer" / "merges.txt").read_text().splitlines()[1:]
    assert len(merges) == _TINY_MERGES
    assert len(tok) == len(vocab) == 256 + 256 + _TINY_MERGES + 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # bytes, then bytes ending a word, then merged tokens
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id) == (len(vocab) - 2, len(vocab) - 1)


def test_tokenizer_round_trips_and_pads_to_77(tiny_checkpoint: Checkpoint, tiny_checkpoint_dir: Path) -> None:
    tok = tiny_checkpoint.tokenizer
    ids = tok("A photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.pad_token_id == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    # Learned merges make common words single tokens.
    assert tok.tokenize("cat") == ["cat</w>"]
    long_ids = tok(" ".join(["castle"] * 200), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long_ids) == 77 and long_ids[-1] == tok.eos_token_id
    # Every byte is in the vocabulary: unseen characters never become the unknown token.
    odd = tok("Ünïcode ☃ qz").input_ids
    assert tok.eos_token_id not in odd[1:-1]
    assert tok.decode(odd, skip_special_tokens=True) == "ünïcode ☃ qz"


def test_tokenizer_folder_loads_in_both_layouts(
    tiny_checkpoint: Checkpoint, tiny_checkpoint_dir: Path, tmp_path: Path
) -> None:
    tok = tiny_checkpoint.tokenizer
    auto = AutoTokenizer.from_pretrained(tiny_checkpoint_dir / "tokenizer", local_files_only=True)
    assert auto("A photo of a cat").input_ids == tok("A photo of a cat").input_ids
    # The vocab.json + merges.txt layout of a real SD 1.5 folder gives the same ids.
    legacy = tmp_path / "tokenizer"
    shutil.copytree(tiny_checkpoint_dir / "tokenizer", legacy)
    (legacy / "tokenizer.json").unlink()
    slow_layout = CLIPTokenizer.from_pretrained(legacy, local_files_only=True)
    assert slow_layout("A photo of a cat").input_ids == tok("A photo of a cat").input_ids
