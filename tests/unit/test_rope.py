"""Rope against transformers 5: inv_freq, cos/sin and rotated q/k, per rope type."""

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig, Qwen3MoeConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

from moeray.kernels.rope import RopeConfig, RotaryCache, apply_rope, rope_cos_sin, rope_inv_freq, rotary_tables, rotate

HEAD_DIM = 32
MAX_POS = 256
SIZES = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM)

# (name, config class, rotary class, rope_parameters)
CASES = [
    ("default-mixtral", MixtralConfig, MixtralRotaryEmbedding, {"rope_type": "default", "rope_theta": 1e6}),
    ("default-qwen3", Qwen3MoeConfig, Qwen3MoeRotaryEmbedding, {"rope_type": "default", "rope_theta": 10000.0}),
    ("linear", MixtralConfig, MixtralRotaryEmbedding, {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}),
    ("dynamic", Qwen3MoeConfig, Qwen3MoeRotaryEmbedding, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
    (
        "yarn",
        Qwen3MoeConfig,
        Qwen3MoeRotaryEmbedding,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e6},
    ),
    (
        "yarn-mscale-untruncated",
        MixtralConfig,
        MixtralRotaryEmbedding,
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
            "beta_fast": 16,
            "beta_slow": 2,
            "truncate": False,
            "rope_theta": 1e4,
        },
    ),
    (
        "yarn-attention-factor",
        MixtralConfig,
        MixtralRotaryEmbedding,
        {
            "rope_type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": 128,
            "attention_factor": 0.8,
            "rope_theta": 1e4,
        },
    ),
    (
        "llama3",
        LlamaConfig,
        LlamaRotaryEmbedding,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        },
    ),
]


def _build(config_cls, rope_parameters):
    hf_config = config_cls(**SIZES, max_position_embeddings=MAX_POS, rope_parameters=dict(rope_parameters))
    ours = RopeConfig.from_hf(hf_config.to_dict(), head_dim=HEAD_DIM)
    return hf_config, ours


def _hf_rotate(rotary, q, k, positions):
    """q, k [T, H, D] -> transformers' rotated q, k in the same layout (and its cos/sin)."""
    position_ids = positions[None]  # [1, T]
    cos, sin = rotary(q, position_ids)  # [1, T, D] in q.dtype
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1), cos[0], sin[0]


def _qk(dtype, num_tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_tokens, 4, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(num_tokens, 2, HEAD_DIM, generator=gen).to(dtype)
    return q, k


@pytest.mark.parametrize("name,config_cls,rotary_cls,rope_parameters", CASES, ids=[c[0] for c in CASES])
def test_inv_freq_matches_rope_init_functions(name, config_cls, rotary_cls, rope_parameters):
    hf_config, ours = _build(config_cls, rope_parameters)
    assert ours.rope_type == rope_parameters["rope_type"]
    if ours.rope_type == "default":
        expected, expected_scaling = rotary_cls.compute_default_rope_parameters(hf_config)
    else:
        expected, expected_scaling = ROPE_INIT_FUNCTIONS[ours.rope_type](hf_config)
    inv_freq, scaling = rope_inv_freq(ours)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (HEAD_DIM // 2,)
    assert torch.equal(inv_freq, expected)
    assert scaling == expected_scaling


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,config_cls,rotary_cls,rope_parameters", CASES, ids=[c[0] for c in CASES])
def test_rotated_qk_match_transformers(name, config_cls, rotary_cls, rope_parameters, dtype):
    hf_config, ours = _build(config_cls, rope_parameters)
    positions = torch.tensor([0, 1, 2, 3, 17, 63, 64, 100, 200, MAX_POS - 1])
    q, k = _qk(dtype, len(positions))
    q_hf, k_hf, cos_hf, sin_hf = _hf_rotate(rotary_cls(hf_config), q, k, positions)

    inv_freq, scaling = rope_inv_freq(ours, seq_len=int(positions.max()) + 1)
    cos, sin = rope_cos_sin(positions, inv_freq, scaling)
    assert cos.dtype == torch.float32 and cos.shape == (len(positions), HEAD_DIM)
    # Identical bits: transformers casts its float32 cos/sin to the activation dtype.
    assert torch.equal(cos.to(dtype), cos_hf) and torch.equal(sin.to(dtype), sin_hf)
    # Both ways of calling give transformers' bits: float32 cos/sin cast inside apply_rope,
    # or cast once by the caller.
    for c, s in ((cos, sin), (cos.to(dtype), sin.to(dtype))):
        q_out, k_out = apply_rope(q, c, s), apply_rope(k, c, s)
        assert q_out.dtype == dtype
        assert torch.equal(q_out, q_hf) and torch.equal(k_out, k_hf)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,config_cls,rotary_cls,rope_parameters",
                         [c for c in CASES if c[3]["rope_type"] != "dynamic"], ids=lambda c: c if isinstance(c, str) else "")
def test_rotary_cache_has_the_bits_of_each_steps_own_tables(name, config_cls, rotary_cls, rope_parameters, dtype):
    """The model looks tables up instead of computing a step's positions: any count (scalar tails
    included), any order, and past the first capacity (the cache grows)."""
    _, ours = _build(config_cls, rope_parameters)
    inv_freq, scaling = rope_inv_freq(ours)
    cache = RotaryCache(inv_freq, scaling, dtype, min_capacity=64)
    gen = torch.Generator().manual_seed(0)
    for count in (1, 3, 13, 16, 77):
        positions = torch.randint(0, 64 if count < 77 else 300, (count,), generator=gen)
        direct = rotary_tables(*rope_cos_sin(positions, inv_freq, scaling), dtype)
        got = cache.lookup(positions)
        assert got.cos.dtype == dtype and got.cos.shape == (count, 1, HEAD_DIM)
        assert torch.equal(got.cos, direct.cos) and torch.equal(got.signed_sin, direct.signed_sin)
    assert cache.tables.cos.shape[0] == 512  # grown to a power of two past position 299

def test_rope_actually_rotates():
    # Guards the comparisons above against a vacuous match: position 0 is the identity,
    # other positions change q but keep its norm per frequency pair.
    _, ours = _build(MixtralConfig, {"rope_type": "default", "rope_theta": 1e4})
    q, _ = _qk(torch.float32, 3)
    cos, sin = rope_cos_sin(torch.tensor([0, 5, 9]), *rope_inv_freq(ours))
    out = apply_rope(q, cos, sin)
    assert torch.equal(out[0], q[0])
    assert not torch.allclose(out[1:], q[1:])
    torch.testing.assert_close(out.norm(dim=-1), q.norm(dim=-1))


@pytest.mark.parametrize("num_tokens", [MAX_POS - 10, MAX_POS + 44, 2 * MAX_POS + 7])
def test_dynamic_follows_sequence_length(num_tokens):
    """Within max_position_embeddings the original frequencies; beyond, transformers' NTK update."""
    rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    hf_config, ours = _build(MixtralConfig, rope_parameters)
    positions = torch.arange(num_tokens)
    for dtype in (torch.float32, torch.bfloat16):
        q, k = _qk(dtype, num_tokens, seed=num_tokens)
        rotary = MixtralRotaryEmbedding(hf_config)  # fresh: nothing cached from a longer call
        q_hf, k_hf, _, _ = _hf_rotate(rotary, q, k, positions)
        inv_freq, scaling = rope_inv_freq(ours, seq_len=num_tokens)
        assert torch.equal(inv_freq, rotary.inv_freq)
        cos, sin = rope_cos_sin(positions, inv_freq, scaling)
        assert torch.equal(apply_rope(q, cos, sin), q_hf) and torch.equal(apply_rope(k, cos, sin), k_hf)

    original, _ = rope_inv_freq(ours)
    assert torch.equal(rope_inv_freq(ours, seq_len=MAX_POS)[0], original)
    assert torch.equal(original, rope_inv_freq(RopeConfig(HEAD_DIM, 1e4, MAX_POS))[0])
    if num_tokens > MAX_POS:
        assert not torch.equal(inv_freq, original)


def test_dynamic_matches_the_tensor_seq_len_path_over_many_lengths():
    # dynamic_rope_update passes seq_len as a tensor, which computes the new base in float32;
    # a Python-float base differs in the last bit for many lengths.
    hf_config = MixtralConfig(
        hidden_size=512, num_attention_heads=4, head_dim=128, max_position_embeddings=4096,
        rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 1e6},
    )
    ours = RopeConfig.from_hf(hf_config.to_dict(), head_dim=128)
    for seq_len in range(4097, 12000, 61):
        expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config, seq_len=torch.tensor(seq_len))
        assert torch.equal(rope_inv_freq(ours, seq_len=seq_len)[0], expected), seq_len


def test_from_hf_legacy_config_json():
    legacy = {
        "max_position_embeddings": 512,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "hidden_size": 128,
        "num_attention_heads": 4,
    }
    ours = RopeConfig.from_hf(legacy, head_dim=HEAD_DIM)
    assert ours == RopeConfig(HEAD_DIM, 500000.0, 512, (("factor", 2.0), ("type", "linear")))
    assert ours.rope_type == "linear"
    hash(ours)
    # transformers reads the same legacy dict to the same frequencies.
    hf_config = MixtralConfig(**{**legacy, "head_dim": HEAD_DIM})
    expected, _ = ROPE_INIT_FUNCTIONS["linear"](hf_config)
    assert torch.equal(rope_inv_freq(ours)[0], expected)


def test_from_hf_legacy_without_scaling_and_theta_defaults():
    null_scaling = RopeConfig.from_hf({"max_position_embeddings": 64, "rope_theta": 1e6, "rope_scaling": None}, 16)
    assert null_scaling == RopeConfig(16, 1e6, 64, ())
    assert null_scaling.rope_type == "default"
    no_theta = RopeConfig.from_hf({"max_position_embeddings": 64}, 16)
    assert no_theta.theta == 10000.0
    assert RopeConfig.from_hf({"max_position_embeddings": 64, "rope_theta": 500000}, 16).theta == 500000.0
    assert RopeConfig.from_hf({"max_position_embeddings": 64}, 16, default_theta=1e6).theta == 1e6


def test_from_hf_transformers5_config_json():
    config_json = {
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    }
    ours = RopeConfig.from_hf(config_json, head_dim=64)
    assert ours.theta == 1e6 and ours.max_position_embeddings == 4096 and ours.head_dim == 64
    assert ours.scaling == (("factor", 4.0), ("original_max_position_embeddings", 1024), ("rope_type", "yarn"))
    # theta only inside rope_parameters; none at all -> 10000
    assert RopeConfig.from_hf({"max_position_embeddings": 8, "rope_parameters": {"rope_type": "default"}}, 8).theta == 1e4


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16, "factor": 4.0},
        {"type": "mrope", "mrope_section": [4, 6, 6]},
    ],
)
def test_unsupported_rope_type_is_a_clear_error(rope_parameters):
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type"))
    config_json = {"max_position_embeddings": 128, "rope_theta": 1e4, "rope_scaling": rope_parameters}
    with pytest.raises(ValueError, match=rf"'{rope_type}'.*supported: default, linear, dynamic, yarn, llama3"):
        RopeConfig.from_hf(config_json, head_dim=HEAD_DIM)
    with pytest.raises(ValueError, match=rope_type):
        RopeConfig(HEAD_DIM, 1e4, 128, (("rope_type", rope_type),))


def test_missing_scaling_parameter_is_a_clear_error():
    with pytest.raises(ValueError, match="factor"):
        RopeConfig.from_hf({"max_position_embeddings": 8, "rope_scaling": {"rope_type": "linear"}}, 8)


def test_native_rotate_has_the_bits_of_the_torch_ops_on_a_fused_projection():
    """float32 on the CPU rotates in one native pass; the q and k heads of a fused q/k/v projection
    (rows strided, heads contiguous) get the bits of transformers' ops on a copy."""
    gen = torch.Generator().manual_seed(12)
    tokens, heads, kv_heads, dim = 7, 4, 2, 18
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen) * 3
    qk = qkv[:, :(heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)  # not contiguous
    inv_freq, scaling = rope_inv_freq(RopeConfig(head_dim=dim, theta=10000.0, max_position_embeddings=128))
    cos, sin = rope_cos_sin(torch.arange(40, 40 + tokens), inv_freq, scaling)
    tables = rotary_tables(cos, sin, torch.float32)
    expected = qk.contiguous() * cos[:, None] + torch.cat((-qk[..., dim // 2:], qk[..., :dim // 2]), dim=-1) * sin[:, None]
    out = rotate(qk, tables)
    assert out.is_contiguous() and torch.equal(out, expected)
