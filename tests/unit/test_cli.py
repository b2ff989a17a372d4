"""`moeray generate` as a user runs it: a real subprocess, its stdout, stderr and exit code (in-process
only where the test watches how stdout is written and flushed)."""

import json
import shutil
import subprocess

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from moeray.models import DEFAULT_MODEL_DIR


def moeray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["moeray", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2)
    model = MixtralForCausalLM(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    path = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(path)
    return path


def test_generate_json_matches_transformers_greedy(tiny_mixtral):
    result = moeray("generate", "--model", str(tiny_mixtral), "--prompt-ids", "1,5,9,33", "--max-tokens", "12", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    ref = AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32).eval()
    expected = ref.generate(torch.tensor([[1, 5, 9, 33]]), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
    # EOS (id 2) may end ours early; compare the common prefix and the reason.
    assert out["token_ids"] == expected[: len(out["token_ids"])]
    assert out["finish_reason"] == ("length" if len(out["token_ids"]) == 12 else "stop")


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "1,x"], "--prompt-ids '1,x' must be comma-separated integers"),
    (["--prompt-ids", "1", "--max-tokens", "0"], "'0' must be an integer >= 1"),
    (["--prompt-ids", "1", "--top-p", "1.5"], "top_p=1.5 must be in (0, 1]"),
    (["--prompt-ids", "1", "--temperature", "-1"], "temperature=-1.0 must be >= 0"),
    (["--prompt-ids", "1,500"], "prompt token id 500 is out of range [0, 97)"),
    (["--prompt-ids", "1", "--dtype", "float16"], "invalid choice: 'float16'"),
    (["--prompt", "hi"], "tokenizer.json"),
    ([], "one of the arguments --prompt --prompt-ids is required"),
])
def test_bad_arguments_exit_2_with_one_line(tiny_mixtral, args, message):
    result = moeray("generate", "--model", str(tiny_mixtral), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_missing_model_folder_exits_2():
    result = moeray("generate", "--model", "/nonexistent/ckpt", "--prompt", "hi")
    assert result.returncode == 2
    assert "'/nonexistent/ckpt': no such checkpoint folder" in result.stderr


def test_default_model_streams_text():
    assert (DEFAULT_MODEL_DIR / "model.safetensors").is_file(), "the built-in model must ship with the package"
    result = moeray("generate", "--prompt", "def fibonacci(n):", "--max-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def fibonacci(n):")
    assert len(result.stdout.strip()) > len("def fibonacci(n):") + 10


def test_default_model_json_text_is_its_token_ids_decoded():
    """--json's "text" is the generated ids decoded by the checkpoint's tokenizer.json (read here with
    the `tokenizers` library itself), and "token_ids" holds the generated ids only."""
    result = moeray("generate", "--prompt", "The", "--max-tokens", "16", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    tokenizer = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    assert 1 <= len(out["token_ids"]) <= 16 and out["text"]
    assert out["text"] == tokenizer.decode(out["token_ids"])


def test_seeded_sampling_repeats_and_the_seed_matters(tiny_mixtral):
    sample = ["generate", "--model", str(tiny_mixtral), "--prompt-ids", "1,5,9,33", "--max-tokens", "24", "--json",
              "--temperature", "1.0", "--top-k", "50", "--top-p", "0.95"]
    runs = [json.loads(moeray(*sample, "--seed", seed).stdout)["token_ids"] for seed in ("7", "7", "8")]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_bfloat16_generates(tiny_mixtral):
    result = moeray("generate", "--model", str(tiny_mixtral), "--prompt-ids", "1,5,9,33", "--max-tokens", "12", "--json",
                    "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    ids = json.loads(result.stdout)["token_ids"]
    assert 1 <= len(ids) <= 12 and all(0 <= i < 97 for i in ids)


@pytest.mark.parametrize("content", ["{not json", '{"version": "1.0"}'])
def test_unreadable_tokenizer_exits_2_naming_the_file(tiny_mixtral, tmp_path, content):
    folder = shutil.copytree(tiny_mixtral, tmp_path / "ckpt")
    (folder / "tokenizer.json").write_text(content)
    result = moeray("generate", "--model", str(folder), "--prompt", "hi")
    assert result.returncode == 2
    assert f"{folder / 'tokenizer.json'}: cannot read tokenizer" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


class _Terminal:
    """stdout as the CLI sees it: what was written, and how much of it had been flushed at each flush."""

    def __init__(self):
        self.pieces, self.flushed = [], []

    def write(self, text):
        self.pieces.append(text)
        return len(text)

    def flush(self):
        self.flushed.append("".join(self.pieces))


def test_text_streams_token_by_token(monkeypatch, capsys):
    """Without --json each step's text is written and flushed as it comes (the prompt first), and all
    of it is the --json run's text."""
    from moeray.cluster.cli import main

    assert main(["generate", "--prompt", "The", "--max-tokens", "12", "--json"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    terminal = _Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    assert main(["generate", "--prompt", "The", "--max-tokens", "12"]) == 0
    assert "".join(terminal.pieces) == "The" + text + "\n"
    assert terminal.flushed[0] == "The"
    steps = [later[len(earlier):] for earlier, later in zip(terminal.flushed, terminal.flushed[1:])]
    assert sum(1 for piece in steps if piece) >= 6 and "".join(steps) == text
