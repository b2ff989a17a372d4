"""A copy of the built-in model whose router sends most tokens to a few hot experts (no downloads).

For every MoE layer, the gate rows of the hot experts get `strength` times the mean gate input
direction added (the mean is measured with transformers on a few fixed texts), so their logits
rise by about `strength` for typical tokens: with strength 4 and hot experts (0, 1), about 90 % of
the routed pairs land on them. Only the gate weights change; the model still generates text.
"""

import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from moeray.models import DEFAULT_MODEL_DIR
from moeray.models.tokenizer import Tokenizer

PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Once upon a time", "1 2 3 4 5", "The capital of France is",
           "import numpy as np", "In the beginning", "Dear Sir or Madam,"]  # load for the skewed model
TEXTS = ["The quick brown fox jumps over the lazy dog.", "def fibonacci(n):\n    return n",
         "Once upon a time there was a king", "1 2 3 4 5 6 7 8 9 10"]


def write_skewed_default(dst: Path, hot: tuple[int, ...] = (0, 1), strength: float = 4.0) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, dst / name)
    means = _mean_gate_inputs()
    weights = load_file(DEFAULT_MODEL_DIR / "model.safetensors")
    for layer, mean in means.items():
        name = f"model.layers.{layer}.block_sparse_moe.gate.weight"
        gate = weights[name].float()  # [E, H]
        gate[list(hot)] += strength * mean / mean.norm() ** 2
        weights[name] = gate.to(weights[name].dtype)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _mean_gate_inputs() -> dict[int, torch.Tensor]:
    """Per MoE layer, the mean of the gate's input over TEXTS' tokens: [H]."""
    model = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32)
    tokenizer = Tokenizer(DEFAULT_MODEL_DIR)
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda _module, args, _out, i=i: seen.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for text in TEXTS:
            model(torch.tensor([tokenizer.encode(text)]))
    for hook in hooks:
        hook.remove()
    return {i: torch.cat(rows).mean(0) for i, rows in seen.items()}
