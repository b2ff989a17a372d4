"""Shared fixtures: tiny random checkpoints of every family, built once per session (see checkpoints.py)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # `import checkpoints` from any test folder

from checkpoints import VOCAB, build_checkpoint, write_fused_mixtral  # noqa: E402


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(name, dtype=torch.float32) -> folder of config `name` (checkpoints.CONFIGS),
    saved by transformers' save_pretrained; built once per session and dtype."""
    root = tmp_path_factory.mktemp("checkpoints")

    def make(name: str, dtype: torch.dtype = torch.float32) -> Path:
        return build_checkpoint(root, name, dtype)

    return make


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A word-level tokenizer over the tiny checkpoints' vocab: id i <-> word 'w%03d' (0-2 special),
    words joined by spaces."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from moeray.models.tokenizer import Tokenizer

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i:03d}": i for i in range(3, VOCAB)}}
    tok = HFTokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    return Tokenizer(folder)


@pytest.fixture(scope="session")
def fused_mixtral(make_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(per-expert folder, fused folder): the same Mixtral weights under both naming schemes."""
    per_expert = make_checkpoint("mixtral_swa")
    return per_expert, write_fused_mixtral(per_expert, tmp_path_factory.mktemp("fused") / "mixtral")
