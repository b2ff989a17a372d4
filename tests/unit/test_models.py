"""Every family against transformers on tiny random checkpoints: logits, greedy tokens, bf16, loading errors."""

import dataclasses
import json
import re
import shutil
import sys

import pytest
import torch
import transformers
from checkpoints import CONFIGS, EOS, FP8_BLOCKS, VOCAB
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeray.actors.engine import Engine, EngineConfig
from moeray.actors.kv_cache import KVCache, kv_bytes_per_token
from moeray.actors.sequence import SamplingParams
from moeray.models import load_model
from moeray.models.checkpoint import CheckpointError
from moeray.models.config import ConfigError
from moeray.models.quant import Fp8Weights
from moeray.models.family import family_for
from moeray.models.model import MoEBlock

transformers.logging.set_verbosity_error()
NAMES = list(CONFIGS)
PROMPTS = [[17, 3, 190, 44, 5], [9, 120, 7, 66, 201, 150, 31, 2, 88, 140, 12, 99, 5]]  # 5 and 13 tokens
NEW_TOKENS = 20  # prompts + new tokens run well past every sliding window (5..7)


def hf_model(folder, dtype=torch.float32):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # full-length runs
    return model


def random_ids(seed=1, shape=(3, 24)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, prompt, num_new=NEW_TOKENS):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_new, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def engine_greedy(model, prompts, num_new=NEW_TOKENS):
    engine = Engine(model, config=EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    done = engine.generate(prompts, SamplingParams(max_tokens=num_new, ignore_eos=True))
    assert all(c.finish_reason == "length" for c in done)
    return [c.token_ids for c in done]


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(make_checkpoint, name):
    folder = make_checkpoint(name)
    ids = random_ids()
    with torch.no_grad():
        expected = hf_model(folder)(ids).logits
    model = load_model(folder)
    got = model(ids)
    assert got.shape == (3, 24, VOCAB) and got.dtype == torch.float32
    assert expected.abs().max() > 5  # weights are scaled up: a real signal, not ~0 everywhere
    assert (got - expected).abs().max().item() < (1e-4 if model.config.mla is None else MLA_TOLERANCE)


# MLA runs absorbed (models/mla.py): the same products summed in another order, not transformers' op
# order. Measured max abs difference over 6 inputs, logits of +-14..18: V3 2.6e-5..5.6e-5, V2
# 5.1e-5..1.5e-4 (its rope is also complex multiplication there); Mixtral 6e-6..1.9e-5 in op order.
MLA_TOLERANCE = 3e-4


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_match_transformers_generate(make_checkpoint, name):
    folder = make_checkpoint(name)
    hf = hf_model(folder)
    expected = [hf_greedy(hf, p) for p in PROMPTS]
    assert engine_greedy(load_model(folder), PROMPTS) == expected  # both prompts in one batch


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of bf16 (8 significant bits) at each |x|."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=1e-3))) - 7)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_checkpoint_in_bfloat16(make_checkpoint, name):
    """bf16 weights run in bf16, against transformers in bf16.

    Tolerance: at least 80% of the [3, 24, V] logits within one bf16 ulp of transformers', and the
    same argmax at 90% of positions. moeray runs transformers' ops in its order and dtypes, but the
    expert matmuls may accumulate in another order (float32 MKL instead of torch's bf16 kernel on CPUs
    without bf16 instructions); a one-ulp change in a bf16 hidden state is then amplified by these
    large random weights into a few logits off by up to ~0.5. Measured: >= 90% within one ulp when
    correct, <= 64% with either bf16 bug this test found (rope frequencies rounded to bf16; Qwen/OLMoE
    top-k weights kept in float32 where transformers rounds them to bf16). A max-abs bound cannot
    separate those (noise 0.47 vs bugs 0.125-4.5), the ulp fraction can.

    Greedy decoding through the paged engine is checked by teacher forcing, so that one flip at a
    near-tie does not cascade: for the engine's own tokens, transformers' logits on the same prefix
    must rank each token first or within 0.5 of the max (a near-tie; logits spread over ~+-15),
    and at least 14 of 16 must be transformers' argmax. MLA rounds differently from transformers
    (see assert_as_close_to_float32_as_transformers); its engine tokens are forced by its own
    cache-free forward instead, which checks the paged path in bf16."""
    folder = make_checkpoint(name, torch.bfloat16)
    ids = random_ids(seed=2)
    hf = hf_model(folder, torch.bfloat16)
    with torch.no_grad():
        expected = hf(ids).logits.float()
    model = load_model(folder, torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.inv_freq.dtype == torch.float32
    got = model(ids)
    if model.config.mla is None:
        within_ulp = ((got - expected).abs() <= bf16_ulp(expected)).float().mean()
        assert within_ulp >= 0.8, within_ulp
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    else:
        assert_as_close_to_float32_as_transformers(folder, model, hf)

    prompt = PROMPTS[1]
    [tokens] = engine_greedy(model, [prompt], 16)
    with torch.no_grad():  # (MLA: by our own cache-free forward, bounded against transformers above)
        forced = (hf(torch.tensor([prompt + tokens])).logits if model.config.mla is None
                  else model(torch.tensor([prompt + tokens])))[0, len(prompt) - 1:-1].float()  # [16, V]
    best = forced.max(dim=-1).values
    chosen = forced[torch.arange(16), torch.tensor(tokens)]
    assert (chosen >= best - 0.5).all(), best - chosen
    assert (chosen == best).sum() >= 14


def assert_as_close_to_float32_as_transformers(folder, model, hf):
    """MLA runs absorbed (models/mla.py): the same products summed in another order, rounded to bf16
    at other points than transformers' expanded keys and values, so agreement to one bf16 ulp is not
    the measure. Against the same bf16 weights run in float32, our error is within 1.25x of
    transformers' bf16 error and our argmax as often right, over 24 x 24 tokens (measured mean abs
    error, ours vs transformers': V3 0.156 vs 0.145 with q LoRA, 0.105 vs 0.105 without; V2 0.146 vs
    0.143; V3 FP8 0.244 vs 0.234; Mixtral and Qwen have transformers' error to the bit). Batches of
    3 x 24 tokens swing from 0.9x to 1.45x as one bf16 flip cascades through these large random
    weights, so the batch is large. (That V2 rotates in float32, which moves the error by less than
    this noise, is checked on its config in test_configs_exercise_their_features.)"""
    ids = random_ids(seed=3, shape=(24, 24))
    with torch.no_grad():  # (.float(): transformers loads an FP8 checkpoint's unquantized tensors in their stored dtype)
        truth = hf_model(folder, torch.float32).float()(ids).logits
        expected = hf(ids).logits.float()
    got = model(ids)
    ours_err, hf_err = (got - truth).abs().mean(), (expected - truth).abs().mean()
    assert ours_err <= 1.25 * hf_err, (ours_err, hf_err)
    ours_right, hf_right = ((x.argmax(-1) == truth.argmax(-1)).float().mean() for x in (got, expected))
    assert ours_right >= hf_right - 0.05, (ours_right, hf_right)


def test_to_bfloat16_keeps_rope_frequencies_float32(make_checkpoint):
    """`model.to(bf16)` of a float32-loaded bf16 checkpoint is the model loaded in bf16 (rope included)."""
    folder = make_checkpoint("mixtral_tied", torch.bfloat16)
    converted = load_model(folder, torch.float32).to(torch.bfloat16)
    assert converted.dtype == torch.bfloat16 and converted.inv_freq.dtype == torch.float32
    ids = random_ids()
    assert torch.equal(converted(ids), load_model(folder, torch.bfloat16)(ids))


def test_configs_exercise_their_features(make_checkpoint):
    """The checkpoints really have what they are named for, so the parity tests above cover it."""
    models = {name: load_model(make_checkpoint(name)) for name in NAMES}
    c = {name: m.config for name, m in models.items()}
    assert c["mixtral_swa"].sliding_windows == (7, 7)
    assert c["qwen2_moe_swa"].sliding_windows == (6, None, None)
    assert c["qwen3_moe_swa_tied"].sliding_windows == (5, 5, 5)
    assert c["mixtral_tied"].head_dim == 16 != c["mixtral_tied"].hidden_size // c["mixtral_tied"].num_heads
    assert models["mixtral_tied"].lm_head is None and models["qwen3_moe_swa_tied"].lm_head is None
    assert c["qwen2_moe_norm"].moe_layers == (False, True, False)  # decoder_sparse_step=2
    assert c["qwen2_moe_swa"].moe_layers == (True, False, True)  # mlp_only_layers=[1]
    assert c["qwen3_moe_dense"].moe_layers == (True, False, True)
    assert c["qwen3_moe_swa_tied"].moe_layers == (False, True, False)
    assert c["qwen2_moe_norm"].routing.renormalize and not c["qwen2_moe_swa"].routing.renormalize
    assert c["qwen2_moe_norm"].shared_expert_intermediate_size == 36 and c["qwen2_moe_norm"].qkv_bias
    assert c["olmoe_clip"].clip_qkv == 0.75 and c["olmoe_clip"].qkv_bias and c["olmoe_clip"].qk_norm == "full"
    lora, yarn = c["deepseek_v3_lora"], c["deepseek_v3_yarn"]
    assert lora.mla.q_lora_rank == 32 and yarn.mla.q_lora_rank is None
    assert lora.mla.rope_interleave and not yarn.mla.rope_interleave and yarn.mla.attention_bias
    assert lora.moe_layers == (False, True, True) and yarn.moe_layers == (True, True)  # first_k_dense_replace
    assert lora.shared_expert_intermediate_size == 48 and yarn.shared_expert_intermediate_size == 24
    assert (lora.routing.num_groups, lora.routing.topk_group, lora.routing.scaling_factor) == (3, 2, 2.5)
    assert lora.routing.renormalize and not yarn.routing.renormalize
    assert lora.attention_scale == 20**-0.5 and yarn.attention_scale > 16**-0.5  # yarn's mscale_all_dim
    v2 = c["deepseek_v2_groups"]
    assert v2.routing.kind == "softmax_group_limited_greedy" and (v2.routing.num_groups, v2.routing.topk_group) == (3, 2)
    assert not v2.routing_bias and v2.rope_in_float32 and v2.mla.rope_interleave and v2.mla.q_lora_rank is None
    oss = c["gpt_oss_swa"]
    assert oss.sliding_windows == (5, None, 5) and oss.attention_sinks and oss.qkv_bias and oss.o_bias
    assert oss.router_bias and oss.expert_bias and oss.expert_layout == "gpt_oss" and oss.routing.kind == "topk_softmax"
    assert (oss.expert_activation.limit, oss.expert_activation.alpha) == (7.0, 1.702)
    assert oss.rope.rope_type == "yarn" and dict(oss.rope.scaling)["truncate"] is False
    assert c["gpt_oss_mxfp4"].expert_layout == "gpt_oss_mxfp4"
    with safe_open(make_checkpoint("gpt_oss_mxfp4") / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.1.mlp.experts.gate_up_proj_blocks").get_dtype() == "U8"
        assert "model.layers.1.mlp.experts.gate_up_proj" not in f.keys()
    assert c["deepseek_v3_fp8"].fp8 == Fp8Weights((16, 32)) and c["qwen3_moe_fp8"].fp8 == Fp8Weights((16, 16))
    with safe_open(make_checkpoint("deepseek_v3_fp8") / "model.safetensors", "pt") as f:
        stored = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert stored["model.layers.1.mlp.experts.4.down_proj.weight"] == stored["model.layers.0.self_attn.kv_b_proj.weight"] == "F8_E4M3"
    assert stored["model.layers.1.mlp.gate.weight"] == stored["model.embed_tokens.weight"] == "F32"
    with safe_open(make_checkpoint("qwen3_moe_fp8") / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.2.mlp.experts.5.up_proj.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "F8_E4M3"
    for name in NAMES:
        assert c[name].num_experts == 6 and c[name].top_k == 3 and c[name].vocab_size == VOCAB
        assert (c[name].fp8 is None) == (name not in FP8_BLOCKS)


@pytest.mark.parametrize("feature", ["correction bias", "rope interleave", "attention scale"])
def test_deepseek_features_matter_at_test_scale(make_checkpoint, feature):
    """Without each of these the logits move: the parity tests above see them."""
    name = "deepseek_v3_yarn" if feature == "attention scale" else "deepseek_v3_lora"
    model = load_model(make_checkpoint(name))
    ids = random_ids()
    before = model(ids)
    for layer in model.layers:
        if feature == "correction bias" and isinstance(layer.mlp, MoEBlock):
            layer.mlp.score_bias.zero_()
        elif feature == "rope interleave":
            layer.attn.rope_order = None
        elif feature == "attention scale":
            layer.attn.scale = 16**-0.5
    assert (model(ids) - before).abs().max() > 1e-2


def test_deepseek_correction_bias_stays_float32(make_checkpoint):
    """transformers keeps e_score_correction_bias in float32 in a bf16 model; so do we, loaded in bf16
    or converted, because a bias rounded to bf16 moves expert choices."""
    folder = make_checkpoint("deepseek_v3_lora")
    expected = load_file(folder / "model.safetensors")["model.layers.1.mlp.gate.e_score_correction_bias"]
    for model in (load_model(folder, torch.bfloat16), load_model(folder).to(torch.bfloat16)):
        assert model.dtype == torch.bfloat16
        bias = model.layers[1].mlp.score_bias
        assert bias.dtype == torch.float32 and torch.equal(bias, expected)


def test_deepseek_multi_token_prediction_layers_are_not_read(make_checkpoint, tmp_path):
    """Hub DeepSeek-V3 checkpoints carry the MTP module as layer `num_hidden_layers`; generation
    does not use it and loading ignores it."""
    folder = make_checkpoint("deepseek_v3_lora")

    def add_mtp_layer(tensors):
        for name in [n for n in tensors if n.startswith("model.layers.2.")]:
            tensors[name.replace("model.layers.2.", "model.layers.3.")] = tensors[name] + 1
        tensors["model.layers.3.eh_proj.weight"] = torch.ones(48, 96)

    copy = broken_copy(folder, tmp_path / "mtp", add_mtp_layer)
    ids = random_ids()
    assert torch.equal(load_model(copy)(ids), load_model(folder)(ids))


def test_mla_caches_one_latent_per_token(make_checkpoint):
    """The KV cache of an MLA model holds r + dr numbers a token and layer (here 20 + 8), values being
    views of the keys, not nh * (dn + dr + dv) = 4 * 30."""
    config = load_model(make_checkpoint("deepseek_v3_lora")).config
    assert config.kv_cache_dims == (1, 28, 20)
    assert kv_bytes_per_token(config, torch.float32) == 3 * 28 * 4
    cache = KVCache(config, torch.float32, budget_bytes=1 << 16, block_size=4)
    assert cache.keys[0].shape[1:] == (1, 28) and cache.values[0].shape[1:] == (1, 20)
    assert cache.values[0].data_ptr() == cache.keys[0].data_ptr()


@pytest.mark.parametrize("feature", ["sinks", "expert clamp", "expert biases", "router bias", "norm rounding"])
def test_gpt_oss_features_matter_at_test_scale(make_checkpoint, feature):
    """Without each of these the logits move (float32, or bf16 for the norm's one rounding): the parity
    tests above see them."""
    dtype = torch.bfloat16 if feature == "norm rounding" else torch.float32
    model = load_model(make_checkpoint("gpt_oss_swa", dtype), dtype)
    ids = random_ids()
    before = model(ids)
    for layer in model.layers:
        if feature == "sinks":
            layer.attn.sinks = None
        elif feature == "expert clamp":
            layer.mlp.experts.activation = dataclasses.replace(layer.mlp.experts.activation, limit=1e9)
        elif feature == "expert biases":
            layer.mlp.experts.b13 = layer.mlp.experts.b2 = None
        elif feature == "router bias":
            layer.mlp.gate_bias = None
        else:
            layer.round_once = False
    assert (model(ids) - before).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["mixtral_swa", "qwen2_moe_swa", "qwen3_moe_swa_tied", "gpt_oss_swa"])
def test_sliding_window_matters_at_test_length(make_checkpoint, name):
    """Without the window the logits of the 24-token test batch change: the parity test sees windows."""
    model = load_model(make_checkpoint(name))
    ids = random_ids()
    with_window = model(ids)
    for layer in model.layers:
        layer.attn.window = None
    assert (model(ids) - with_window).abs().max() > 1e-2


def test_generation_config_eos_tokens_stop_as_in_transformers(make_checkpoint, tmp_path):
    """Chat releases list their end-of-turn token in generation_config.json only (config.json says
    <|endoftext|>): transformers' generate stops on generation_config.json's tokens, and so does the engine."""
    folder = tmp_path / "chat"
    shutil.copytree(make_checkpoint("qwen3_moe_dense"), folder)
    prompt = PROMPTS[1]
    free = engine_greedy(load_model(folder), [prompt])[0]  # eos ignored: where would it stop?
    stop = next(t for t in free[3:] if t != EOS)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [VOCAB - 1, stop]}))
    model = load_model(folder)
    assert model.config.eos_token_ids == (VOCAB - 1, stop)
    engine = Engine(model, config=EngineConfig(block_size=4, kv_cache_bytes=1 << 20))
    [done] = engine.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS))
    assert done.finish_reason == "stop" and done.token_ids == free[:free.index(stop) + 1]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert out[0, len(prompt):].tolist() == done.token_ids

    for bad in ([], ["2"], -1, True):
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(ConfigError, match=re.escape(f"generation_config.json: eos_token_id={bad!r} must be")):
            load_model(folder)
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="generation_config.json: not a valid JSON config"):
        load_model(folder)


def test_clip_qkv_clips_at_test_scale(make_checkpoint):
    model = load_model(make_checkpoint("olmoe_clip"))
    ids = random_ids()
    clipped = model(ids)
    for layer in model.layers:
        layer.attn.config = dataclasses.replace(layer.attn.config, clip_qkv=None)
    assert (model(ids) - clipped).abs().max() > 1e-2


def test_fused_expert_names_load_the_same_weights(fused_mixtral):
    per_expert, fused = fused_mixtral
    names = set(load_file(fused / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert not any("block_sparse_moe" in n or ".w1." in n for n in names)
    a, b = load_model(per_expert), load_model(fused)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    ids = random_ids()
    assert torch.equal(a(ids), b(ids))
    with torch.no_grad():
        expected = hf_model(per_expert)(ids).logits
    assert (b(ids) - expected).abs().max() < 1e-4
    blocks = [layer.mlp for layer in b.layers]
    assert all(isinstance(m, MoEBlock) and m.experts.w13.shape == (6, 80, 48) for m in blocks)


def saved_config(make_checkpoint, name) -> dict:
    return json.loads((make_checkpoint(name) / "config.json").read_text())


@pytest.mark.parametrize("max_window_layers", [0, 1, 2, 3])
def test_qwen2_moe_sliding_layers_without_layer_types(make_checkpoint, max_window_layers):
    """Older Qwen2-MoE configs have no `layer_types`: the rule must be transformers' own."""
    raw = saved_config(make_checkpoint, "qwen2_moe_swa")
    del raw["layer_types"]
    raw.update(max_window_layers=max_window_layers, num_hidden_layers=5)
    expected = transformers.Qwen2MoeConfig(**raw).layer_types
    windows = family_for(raw).parse(raw).sliding_windows
    assert windows == tuple(6 if t == "sliding_attention" else None for t in expected)


@pytest.mark.parametrize("name", ["mixtral_tied", "qwen3_moe_dense", "olmoe_clip", "qwen2_moe_norm"])
def test_num_experts_under_either_name(make_checkpoint, name):
    """transformers 5 saves Qwen3-MoE's expert count as num_local_experts, Hub configs say num_experts."""
    raw = saved_config(make_checkpoint, name)
    count = raw.pop("num_experts", None) or raw.pop("num_local_experts")
    family = family_for(raw)
    # the names transformers reads for this family (its attribute_map resolves `num_experts`)
    accepted = [key for key in ("num_experts", "num_local_experts")
                if transformers.AutoConfig.for_model(raw["model_type"], **{key: count}).num_experts == count]
    assert "num_experts" in accepted
    for key in accepted:
        assert family.parse({**raw, key: count}).num_experts == count
    if len(accepted) == 2:
        with pytest.raises(ConfigError, match="disagree"):
            family.parse({**raw, "num_experts": count, "num_local_experts": count + 1})
    with pytest.raises(ConfigError, match="num_experts"):
        family.parse(raw)


def test_a_new_family_is_a_new_module(tmp_path, monkeypatch):
    """Dropping a module into models/families registers its family, with no other file edited (here
    the module sits in a second folder of the package's path)."""
    import moeray.models.families as families
    from moeray.models import family as registry

    (tmp_path / "toy_moe.py").write_text(
        "from moeray.models.families.mixtral import Mixtral\n"
        "from moeray.models.family import register\n"
        "class Toy(Mixtral):\n    name = 'toy'\n    architectures = ('ToyMoeForCausalLM',)\n"
        "register(Toy())\n")
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    assert "ToyMoeForCausalLM" not in registry.supported()
    try:
        families.import_all()  # what importing the package does
        assert family_for({"architectures": ["ToyMoeForCausalLM"]}).name == "toy"
        assert family_for({"architectures": ["MixtralForCausalLM"]}).name == "mixtral"
    finally:  # the toy module is gone for the tests after this one
        sys.modules.pop(f"{families.__name__}.toy_moe", None)
        families.__dict__.pop("toy_moe", None)


# Only what has no sensible default: the sizes (and Qwen's expert width under its own name).
MINIMAL = dict(vocab_size=101, hidden_size=128, num_attention_heads=32, num_hidden_layers=2, num_experts_per_tok=2)
MINIMAL_MOE = {"MixtralForCausalLM": dict(num_local_experts=4, intermediate_size=32),
               "DeepseekV3ForCausalLM": dict(n_routed_experts=16, moe_intermediate_size=32, intermediate_size=64,
                                             first_k_dense_replace=1),
               "DeepseekV2ForCausalLM": dict(n_routed_experts=8, moe_intermediate_size=32, intermediate_size=64),
               "OlmoeForCausalLM": dict(num_experts=4, intermediate_size=32),
               "Qwen2MoeForCausalLM": dict(num_experts=4, moe_intermediate_size=32),
               "Qwen3MoeForCausalLM": dict(num_experts=4, moe_intermediate_size=32),
               "GptOssForCausalLM": dict(num_local_experts=4, intermediate_size=32)}


@pytest.mark.parametrize("arch", list(MINIMAL_MOE))
def test_absent_fields_read_as_transformers_reads_them(arch):
    """A config.json that leaves out rms_norm_eps, rope_theta, num_key_value_heads, eos_token_id...
    gets the family's defaults, which are transformers' ones: the same config as the one transformers
    writes back with its class defaults filled in (Mixtral's rope_theta 1e6 and rms_norm_eps 1e-5 are
    not Qwen's 1e4 and 1e-6)."""
    raw = {"architectures": [arch], **MINIMAL, **MINIMAL_MOE[arch]}
    family = family_for(raw)
    hf = transformers.AutoConfig.for_model(family.name, **MINIMAL, **MINIMAL_MOE[arch])  # names are model_types
    ours = family.parse(raw)
    assert ours == family.parse({**hf.to_dict(), "architectures": [arch]})
    assert (ours.rms_norm_eps, ours.rope.theta) == (hf.rms_norm_eps, hf.rope_parameters["rope_theta"])
    if ours.mla is None:  # MLA has no kv heads of its own
        assert ours.num_kv_heads == hf.num_key_value_heads


BAD_DEEPSEEK = [  # (checkpoint, edit of its config.json, what the error names); quantized: any family
    ("deepseek_v3_lora", dict(n_group=4), "n_routed_experts=6 is not a multiple of n_group=4"),
    ("deepseek_v3_lora", dict(topk_group=4), "topk_group=4 must be <= n_group=3"),
    ("deepseek_v3_lora", dict(topk_group=1), "num_experts_per_tok=3 is more than the 1 kept groups"),
    ("deepseek_v3_lora", dict(kv_lora_rank=0), "kv_lora_rank=0 must be >= 1"),
    ("deepseek_v3_lora", dict(rope_interleave="yes"), "rope_interleave='yes' must be of type bool"),
    ("deepseek_v2_groups", dict(topk_method="noaux_tc"), "topk_method='noaux_tc' is not supported"),
    ("deepseek_v2_groups", dict(mlp_bias=True), "mlp_bias=True is not supported"),
    ("deepseek_v3_lora", dict(n_group=6, topk_group=3), "n_group=6 leaves groups of 1 expert"),
    ("deepseek_v3_lora", dict(norm_topk_prob="yes"), "norm_topk_prob='yes' must be of type bool"),
    ("mixtral_swa", dict(quantization_config={"quant_method": "awq"}), "quant_method='awq') is not supported"),
    ("mixtral_swa", dict(quantization_config={"quant_method": "mxfp4"}), "quant_method='mxfp4') is not supported"),
    ("gpt_oss_swa", dict(layer_types=["sliding_attention"]),
     "layer_types=['sliding_attention'] must give 'sliding_attention' or 'full_attention' for each of the 3 layers"),
    ("gpt_oss_swa", dict(layer_types=["sliding_attention", "chunked", "full_attention"]), "layer_types="),
    ("gpt_oss_swa", dict(swiglu_limit=-1.0), "swiglu_limit=-1.0 must be >= 0.0"),
    ("gpt_oss_swa", dict(sliding_window=None), "sliding_window=None must be of type int"),
    ("mixtral_swa", dict(quantization_config="fp8"), "quantization_config='fp8' must be an object"),
    ("deepseek_v3_fp8", dict(quantization_config={"quant_method": "fp8", "weight_block_size": [128]}),
     "weight_block_size=[128] must be two positive integers"),
    ("deepseek_v3_fp8", dict(quantization_config={"quant_method": "fp8", "weight_block_size": [0, 128]}),
     "weight_block_size=[0, 128] must be two positive integers"),
    ("deepseek_v3_fp8", dict(quantization_config={"quant_method": "fp8", "expert_dtype": "fp4"}),
     "expert_dtype='fp4' is not supported"),
    ("deepseek_v3_fp8", dict(quantization_config={"quant_method": "fp8", "scale_fmt": "e4m3"}),
     "scale_fmt='e4m3' is not supported (supported: 'float', 'ue8m0')"),
    ("deepseek_v3_fp8", dict(quantization_config={"quant_method": "fp8", "activation_scheme": "tensor"}),
     "activation_scheme='tensor' is not supported"),
]


@pytest.mark.parametrize("name, edit, message", BAD_DEEPSEEK)
def test_bad_deepseek_or_quantized_config_is_named(make_checkpoint, name, edit, message):
    raw = {**saved_config(make_checkpoint, name), **edit}
    with pytest.raises(ConfigError, match=re.escape(message)):
        family_for(raw).parse(raw)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_unsupported_architecture_is_named(make_checkpoint, tmp_path, arch):
    folder = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("mixtral_tied"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": [arch]}))
    with pytest.raises(ConfigError, match=f"'{arch}' is not supported.*MixtralForCausalLM"):
        load_model(folder)


def test_missing_architectures_field(make_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("mixtral_tied"), folder)
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="architectures"):
        load_model(folder)


def broken_copy(src, dst, edit):
    """Copy checkpoint `src` to `dst` with `edit(tensors)` applied to its tensors."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _shrink(tensors, name):
    tensors[name] = tensors[name][:-1].clone()


BROKEN = {  # (config, edit, tensor the error must name)
    "missing dense": ("mixtral_swa", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
                      "model.layers.1.self_attn.k_proj.weight"),
    "missing expert": ("mixtral_swa", lambda t: t.pop("model.layers.1.block_sparse_moe.experts.4.w3.weight"),
                       "model.layers.1.block_sparse_moe.experts.4.w3.weight"),
    "missing norm": ("qwen3_moe_dense", lambda t: t.pop("model.layers.2.self_attn.k_norm.weight"),
                     "model.layers.2.self_attn.k_norm.weight"),
    "shape dense": ("mixtral_swa", lambda t: _shrink(t, "model.layers.0.self_attn.q_proj.weight"),
                    "model.layers.0.self_attn.q_proj.weight"),
    "shape concatenated": ("qwen2_moe_swa", lambda t: _shrink(t, "model.layers.1.mlp.up_proj.weight"),
                           "model.layers.1.mlp.up_proj.weight"),
    "shape expert": ("mixtral_swa", lambda t: _shrink(t, "model.layers.1.block_sparse_moe.experts.2.w2.weight"),
                     "model.layers.1.block_sparse_moe.experts.2.w2.weight"),
    "shape bias": ("qwen2_moe_swa", lambda t: _shrink(t, "model.layers.2.self_attn.v_proj.bias"),
                   "model.layers.2.self_attn.v_proj.bias"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoint_names_file_and_tensor(make_checkpoint, tmp_path, case):
    name, edit, tensor = BROKEN[case]
    folder = broken_copy(make_checkpoint(name), tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    assert str(folder / "model.safetensors") in str(err.value) and f"'{tensor}'" in str(err.value)


def test_truncated_checkpoint_names_file_and_tensor(make_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("mixtral_swa"), folder)
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: data of tensor 'model\.\S+'"):
        load_model(folder)


def test_missing_weights_file(make_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("mixtral_swa"), folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)
