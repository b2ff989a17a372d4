"""Tiny random checkpoints of every supported family, built with transformers (no downloads).

Sizes are deliberately odd (E=6, K=3, vocab 211, head_dim != hidden / heads in places) and the
weights are re-drawn much larger than transformers' init (std 0.02), so that a wrong norm order,
a missing bias or a swapped projection moves the logits by whole units, not by 1e-6.

    folder = build_checkpoint(tmp_path, "mixtral_swa")           # float32 safetensors + config.json
    folder = build_checkpoint(tmp_path, "olmoe_clip", torch.bfloat16)
    fused = write_fused_mixtral(folder, tmp_path / "fused")      # same weights, fused expert names
    folder = build_checkpoint(tmp_path, "deepseek_v3_fp8")       # linear weights as block-wise float8
"""

import json
import math
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

VOCAB = 211  # not a power of two
EOS = 2

_COMMON = dict(vocab_size=VOCAB, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
               rms_norm_eps=1e-6, max_position_embeddings=256, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)

# name -> (transformers class, config class, config kwargs). Every family, every feature the
# loader distinguishes: sliding windows shorter than the test sequences, tied embeddings,
# explicit head_dim, shared experts, both norm_topk_prob values, dense layers, clip_qkv, biases.
CONFIGS = {
    "mixtral_swa": ("MixtralForCausalLM", "MixtralConfig", dict(
        num_hidden_layers=2, intermediate_size=40, num_local_experts=6, num_experts_per_tok=3,
        sliding_window=7, rope_theta=10000.0)),
    "mixtral_tied": ("MixtralForCausalLM", "MixtralConfig", dict(
        num_hidden_layers=2, intermediate_size=40, num_local_experts=6, num_experts_per_tok=3,
        head_dim=16, tie_word_embeddings=True, rope_theta=1000.0)),
    "qwen2_moe_norm": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(
        num_hidden_layers=3, intermediate_size=56, moe_intermediate_size=24, shared_expert_intermediate_size=36,
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=2)),
    "qwen2_moe_swa": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(
        num_hidden_layers=3, intermediate_size=56, moe_intermediate_size=24, shared_expert_intermediate_size=36,
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1],
        use_sliding_window=True, sliding_window=6, max_window_layers=2)),
    "qwen3_moe_dense": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        num_hidden_layers=3, intermediate_size=56, moe_intermediate_size=24, head_dim=16,
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen3_moe_swa_tied": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        num_hidden_layers=3, intermediate_size=56, moe_intermediate_size=24, head_dim=8,
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=2,
        use_sliding_window=True, sliding_window=5, tie_word_embeddings=True)),
    "olmoe_clip": ("OlmoeForCausalLM", "OlmoeConfig", dict(
        num_hidden_layers=2, intermediate_size=40, num_experts=6, num_experts_per_tok=3,
        clip_qkv=0.75, attention_bias=True, norm_topk_prob=False)),
    # MLA with a q LoRA (and biases, q_a_proj's too) and interleaved rope; 3 groups of 2 experts,
    # 2 kept; a dense first layer; two shared experts.
    "deepseek_v3_lora": ("DeepseekV3ForCausalLM", "DeepseekV3Config", dict(
        num_hidden_layers=3, num_key_value_heads=4, intermediate_size=56, moe_intermediate_size=24,
        n_routed_experts=6, num_experts_per_tok=3, n_group=3, topk_group=2, n_shared_experts=2,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=20, qk_rope_head_dim=8, qk_nope_head_dim=12,
        v_head_dim=10, routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True)),
    # MLA without a q LoRA, halves rope scaled by yarn (mscale_all_dim scales the softmax), biases,
    # unnormalised top-k weights, every layer MoE.
    "deepseek_v3_yarn": ("DeepseekV3ForCausalLM", "DeepseekV3Config", dict(
        num_hidden_layers=2, num_key_value_heads=4, intermediate_size=56, moe_intermediate_size=24,
        n_routed_experts=6, num_experts_per_tok=3, n_group=3, topk_group=2, n_shared_experts=1,
        first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=6, qk_nope_head_dim=10,
        v_head_dim=14, routed_scaling_factor=1.5, norm_topk_prob=False, rope_interleave=False,
        attention_bias=True, num_nextn_predict_layers=0,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                             mscale=1.0, mscale_all_dim=1.0, beta_fast=32, beta_slow=1))),
    # DeepSeek-V2: softmax group-limited greedy routing (3 groups, 2 kept), MLA without a q LoRA on
    # rope computed as complex numbers (interleaved pairs), a dense first layer.
    "deepseek_v2_groups": ("DeepseekV2ForCausalLM", "DeepseekV2Config", dict(
        num_hidden_layers=3, num_key_value_heads=4, intermediate_size=56, moe_intermediate_size=24,
        n_routed_experts=6, num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=3, topk_group=2,
        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=20, qk_rope_head_dim=8,
        qk_nope_head_dim=12, v_head_dim=10, routed_scaling_factor=2.0)),
    # DeepSeek-V3 as Hub checkpoints ship it: every linear weight float8 with block scales (FP8_BLOCKS),
    # the router, embeddings and norms not. Sizes are multiples of the blocks (see FP8_BLOCKS).
    "deepseek_v3_fp8": ("DeepseekV3ForCausalLM", "DeepseekV3Config", dict(
        hidden_size=64, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=32,
        n_routed_experts=6, num_experts_per_tok=3, n_group=3, topk_group=2, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True)),
    # GPT-OSS: sinks, attention and expert biases, sliding windows on layers 0 and 2, yarn rope without
    # truncation, a biased router, clamped experts stored interleaved.
    "gpt_oss_swa": ("GptOssForCausalLM", "GptOssConfig", dict(
        num_hidden_layers=3, intermediate_size=40, num_local_experts=6, num_experts_per_tok=3, head_dim=16,
        sliding_window=5, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0,
                                               beta_slow=1.0, truncate=False, original_max_position_embeddings=64))),
    # GPT-OSS as the Hub's releases ship: experts as MXFP4 blocks (`write_mxfp4`; sizes multiples of 32).
    "gpt_oss_mxfp4": ("GptOssForCausalLM", "GptOssConfig", dict(
        hidden_size=64, num_hidden_layers=2, intermediate_size=32, num_local_experts=6, num_experts_per_tok=3,
        head_dim=16, sliding_window=6)),
    # Qwen3-MoE as its -FP8 releases ship: q/k norms, a dense layer, linear weights float8 in square blocks.
    "qwen3_moe_fp8": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=32, head_dim=16,
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[1])),
}

# Checkpoints written with FP8 weights (`write_fp8`): name -> (rows, cols) of a scale block. Not square,
# so that swapped axes show. transformers' dequantization derives the block from the scale grid
# (rows // grid rows) and refuses sizes that are not a multiple of it: these sizes are (cut-short
# blocks are checked element by element in test_quant.py).
FP8_BLOCKS = {"deepseek_v3_fp8": (16, 32), "qwen3_moe_fp8": (16, 16)}


# Checkpoints whose experts are written as MXFP4 (`write_mxfp4`).
MXFP4 = {"gpt_oss_mxfp4"}


def hf_config(name: str):
    _, config_cls, kwargs = CONFIGS[name]
    return getattr(transformers, config_cls)(**{**_COMMON, **kwargs})


def build_hf_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A transformers model of config `name` with large random weights (float32, eval mode)."""
    model_cls = getattr(transformers, CONFIGS[name][0])
    torch.manual_seed(seed)
    model = model_cls(hf_config(name)).eval()
    scale_up(model, seed)
    return model


@torch.no_grad()
def scale_up(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter: matrices N(0, 0.5), vectors (norm weights, biases) around 1 / 0,
    GPT-OSS's attention sinks N(0, 4); and DeepSeek's routing correction bias (a buffer), N(0, 0.5)
    too, so that it moves choices."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in [*model.named_parameters(), *((n, b) for n, b in model.named_buffers()
                                                      if n.endswith("e_score_correction_bias"))]:
        if param.dim() >= 2:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        elif name.endswith("sinks"):  # GPT-OSS: as large as the attention scores, so that they matter
            param.copy_(torch.randn(param.shape, generator=gen) * 4)
        elif name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        else:  # RMSNorm weights
            param.copy_(0.5 + torch.rand(param.shape, generator=gen))


def build_checkpoint(root: Path, name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Save config `name` (weights in `dtype`) with save_pretrained under root/name-dtype -> the folder."""
    folder = Path(root) / f"{name}-{str(dtype).removeprefix('torch.')}"
    if not (folder / "config.json").is_file():
        build_hf_model(name, seed).to(dtype).save_pretrained(folder)
        if name in FP8_BLOCKS:
            write_fp8(folder, FP8_BLOCKS[name])
        if name in MXFP4:
            write_mxfp4(folder)
    return folder


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [R, C] -> (float8_e4m3fn [R, C], float32 scale_inv [ceil(R / br), ceil(C / bc)]), the way
    DeepSeek's tools quantize: each block divided by max |block| / 448 (e4m3's largest), last blocks cut short."""
    (rows, cols), (br, bc) = weight.shape, block
    grid = (math.ceil(rows / br), math.ceil(cols / bc))
    padded = torch.zeros(grid[0] * br, grid[1] * bc)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(grid[0], br, grid[1], bc)
    largest = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(largest > 0, largest / 448.0, torch.ones_like(largest))
    quantized = (blocks / scale_inv[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return quantized.view(grid[0] * br, grid[1] * bc)[:rows, :cols].contiguous(), scale_inv


def write_fp8(folder: Path, block: tuple[int, int]) -> None:
    """Rewrite a saved checkpoint as a block-wise FP8 one, in place: every linear weight (`*_proj.weight`,
    `kv_a_proj_with_mqa.weight`) becomes float8 plus `<name>_scale_inv`; config.json says so."""
    tensors = load_file(folder / "model.safetensors")
    out = {}
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and name.endswith(("_proj.weight", "_proj_with_mqa.weight")):
            out[name], out[f"{name}_scale_inv"] = quantize_fp8(tensor, block)
        else:
            out[name] = tensor
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., C] (C a multiple of 32) -> (uint8 blocks [..., C/32, 16], uint8 scales [..., C/32]): each
    block of 32 scaled by the power of two that brings its largest value to at most 6 (FP4's largest),
    each value rounded to the nearest FP4 number (E2M1, sign in bit 3), two a byte, low nibble first."""
    from moeray.models.quant import FP4_VALUES

    blocks = weight.float().unflatten(-1, (-1, 32))  # [..., G, 32]
    largest = blocks.abs().amax(dim=-1, keepdim=True).clamp_min(2.0**-100)
    exponent = torch.ceil(torch.log2(largest / 6.0))  # [..., G, 1]
    scaled = blocks / torch.exp2(exponent)
    magnitudes = torch.tensor(FP4_VALUES[:8])
    codes = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)  # [..., G, 32] in 0..7
    codes = codes | ((scaled < 0).long() << 3)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)  # [..., G, 16]
    return packed, (exponent.squeeze(-1) + 127).to(torch.uint8)


def write_mxfp4(folder: Path) -> None:
    """Rewrite a saved GPT-OSS checkpoint's experts as the Hub ships them, in place: `gate_up_proj [E, H, 2I]`
    becomes `gate_up_proj_blocks`/`_scales` over [E, 2I, H] (rows still interleaved), `down_proj [E, I, H]`
    `down_proj_blocks`/`_scales` over [E, H, I]; config.json says quant_method "mxfp4"."""
    tensors = load_file(folder / "model.safetensors")
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[f"{name}_blocks"], out[f"{name}_scales"] = quantize_mxfp4(tensor.transpose(1, 2))
        else:
            out[name] = tensor
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_fused_mixtral(src: Path, dst: Path) -> Path:
    """Copy a Mixtral checkpoint, renaming its experts to transformers 5's fused in-memory names:
    `model.layers.{l}.mlp.experts.gate_up_proj [E, 2I, H]`, `...experts.down_proj [E, H, I]` and
    `model.layers.{l}.mlp.gate.weight`."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    out = {name: t for name, t in tensors.items() if ".block_sparse_moe." not in name}
    for layer in range(config["num_hidden_layers"]):
        old, new = f"model.layers.{layer}.block_sparse_moe", f"model.layers.{layer}.mlp"
        experts = range(config["num_local_experts"])
        out[f"{new}.gate.weight"] = tensors[f"{old}.gate.weight"]
        out[f"{new}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{old}.experts.{e}.w1.weight"], tensors[f"{old}.experts.{e}.w3.weight"]]) for e in experts])
        out[f"{new}.experts.down_proj"] = torch.stack([tensors[f"{old}.experts.{e}.w2.weight"] for e in experts])
    assert len(out) == len(tensors) - config["num_hidden_layers"] * (1 + 3 * config["num_local_experts"]) + 3 * config["num_hidden_layers"]
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    return dst
