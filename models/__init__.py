"""Model families (config parsing, weight names, layer assembly), checkpoint loading and the built-in default model.

    from moeray.models import load_model
    model = load_model("path/to/checkpoint", dtype=torch.float32)   # None: the built-in model
    logits = model(input_ids)                                       # [B, T] -> [B, T, V]
"""

from moeray.models.loader import DEFAULT_MODEL_DIR, load_config, load_model

__all__ = ["DEFAULT_MODEL_DIR", "load_config", "load_model"]
