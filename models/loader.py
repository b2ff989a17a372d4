"""Build a `MoEModel` from a checkpoint folder: parse config.json, create empty modules, fill them.

Dense weights (attention, norms, gates, shared experts, embeddings, head) map one-to-one or by
concatenation to checkpoint tensors; routed experts go through `checkpoint.load_experts`, which
reads only the experts asked for (expert groups load just their own slots).
"""

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from moeray.models.checkpoint import CheckpointError, CheckpointReader, load_expert_biases, load_experts, read_config
from moeray.models.config import ConfigError, ModelConfig
from moeray.models.family import Family, family_for
from moeray.models.layers import WeightNames, whole
from moeray.models.model import MakeExperts, MoEBlock, MoEModel

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"
GENERATION_CONFIG_FILE = "generation_config.json"

Progress = Callable[[int, int], None]  # (layers done, layers total)


def load_config(path: str | Path) -> tuple[ModelConfig, Family]:
    """config.json parsed by its family, with generation_config.json's end-of-sequence tokens where it has any."""
    raw = read_config(path)
    family = family_for(raw)
    config = family.parse(raw)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    eos = generation_eos(folder / GENERATION_CONFIG_FILE)
    return (config if eos is None else dataclasses.replace(config, eos_token_ids=eos)), family


def generation_eos(file: Path) -> tuple[int, ...] | None:
    """`eos_token_id` of a generation_config.json (an id or a list of them), or None without the file or
    the field. transformers' generate stops on these in place of config.json's, and chat releases list
    their end-of-turn tokens there only (Qwen's <|im_end|>, GPT-OSS's <|return|> and <|call|>)."""
    if not file.is_file():
        return None
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: not a valid JSON config: {exc}") from exc
    eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
    if eos is None:
        return None
    ids = eos if isinstance(eos, list) else [eos]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{file}: eos_token_id={eos!r} must be a token id or a non-empty list of them")
    return tuple(ids)


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
               progress: Progress | None = None, make_experts: MakeExperts | None = None) -> MoEModel:
    """The model in `path` (default: the built-in model) with every weight loaded, in `dtype`.

    With `make_experts`, the routed experts are whatever it builds (the router's dispatch to
    expert groups) and no expert weight is read or allocated here."""
    path = Path(path) if path is not None else DEFAULT_MODEL_DIR
    config, family = load_config(path)
    with default_dtype(dtype):
        model = MoEModel(config, make_experts)
    with CheckpointReader(path, config.fp8) as reader:
        load_dense_weights(model, family, reader)
        for block in moe_blocks(model) if make_experts is None else []:
            prefix = moe_prefix(family, reader, block.layer)
            sizes = (config.hidden_size, config.moe_intermediate_size, config.num_experts, dtype)
            experts = block.experts
            experts.w13.data, experts.w2.data = load_experts(reader, prefix, range(config.num_experts), *sizes,
                                                             config.expert_layout)
            if config.expert_bias:
                experts.b13.data, experts.b2.data = load_expert_biases(reader, prefix, range(config.num_experts), *sizes)
            if progress:
                progress(block.layer + 1, config.num_layers)
    return model.eval()


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters directly in `dtype` (no float32 copy of a bf16 model on the way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def moe_blocks(model: MoEModel) -> list[MoEBlock]:
    return [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoEBlock)]


def moe_prefix(family: Family, reader: CheckpointReader, layer: int) -> str:
    """The name under which this checkpoint keeps layer `layer`'s MoE block."""
    candidates = family.moe_prefixes(layer)
    for prefix in candidates:
        if reader.has(f"{prefix}.{family.gate_name}.weight"):
            return prefix
    raise CheckpointError(f"{reader.path}: no MoE gate for layer {layer}; looked for "
                          + ", ".join(f"'{p}.{family.gate_name}.weight'" for p in candidates))


def load_dense_weights(model: MoEModel, family: Family, reader: CheckpointReader) -> None:
    """Everything but the routed experts: parameter <- one checkpoint tensor or a concatenation."""
    for param, parts in dense_weight_names(model, family, reader).items():
        # The reader checks each part's shape from its header, so the error names the shard file and the tensor.
        tensors = [reader.get(name, dtype=param.dtype, shape=(rows, *param.shape[1:])) for name, rows in parts]
        param.data = (tensors[0] if len(tensors) == 1 else torch.cat(tensors)).contiguous()


def dense_weight_names(model: MoEModel, family: Family, reader: CheckpointReader) -> WeightNames:
    """Each module names its own tensors under the prefix the family gives it."""
    names = {model.embed: whole(model.embed, "model.embed_tokens.weight"), model.norm: whole(model.norm, "model.norm.weight")}
    if model.lm_head is not None:
        names[model.lm_head] = whole(model.lm_head, "lm_head.weight")
    for i, layer in enumerate(model.layers):
        prefix = family.layer_prefix(i)
        names[layer.input_norm] = whole(layer.input_norm, f"{prefix}.input_layernorm.weight")
        names[layer.post_attention_norm] = whole(layer.post_attention_norm, f"{prefix}.post_attention_layernorm.weight")
        names.update(layer.attn.weight_names(f"{prefix}.self_attn"))
        if isinstance(layer.mlp, MoEBlock):
            moe = moe_prefix(family, reader, i)
            names[layer.mlp.gate] = whole(layer.mlp.gate, f"{moe}.{family.gate_name}.weight")
            if layer.mlp.gate_bias is not None:
                names[layer.mlp.gate_bias] = whole(layer.mlp.gate_bias, f"{moe}.{family.gate_name}.bias")
            if layer.mlp.score_bias is not None:
                names[layer.mlp.score_bias] = whole(layer.mlp.score_bias, f"{moe}.gate.e_score_correction_bias")
            if layer.mlp.shared is not None:
                names.update(layer.mlp.shared.weight_names(family.shared_expert_prefix(moe)))
            if layer.mlp.shared_gate is not None:
                names[layer.mlp.shared_gate] = whole(layer.mlp.shared_gate, f"{moe}.shared_expert_gate.weight")
        else:
            names.update(layer.mlp.weight_names(family.dense_mlp_prefix(i)))
    return names
