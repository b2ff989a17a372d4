"""One module per supported Hugging Face model family; importing this package registers them all."""

from moeray.models.families import mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401
