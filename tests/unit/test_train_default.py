"""models/train_default.py, which made the built-in model, still runs and still makes a checkpoint
moeray and transformers load alike (two steps, small batches: a smoke run, not the real training)."""

import subprocess
import sys

import torch
import transformers

from moeray.models import load_model
from moeray.models.tokenizer import Tokenizer


def test_two_training_steps_make_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "default"
    result = subprocess.run([sys.executable, "-m", "moeray.models.train_default", "--out", str(out), "--steps", "2",
                             "--batch", "2", "--seq", "32", "--eval-every", "1000"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained 2 steps" in result.stdout
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json"]
    ids = torch.tensor([Tokenizer(out).encode("The for statement")])
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)
