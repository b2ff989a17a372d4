"""Expert routing: vectorised kinds vs their per-token references, and vs transformers' own routers."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DeepseekV2Config, DeepseekV3Config, GptOssConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig,
)
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from moeray.kernels.routing import RoutingConfig, route, route_reference

HIDDEN = 32


def by_id(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical per-token order (ascending id) for kinds whose K order is torch.topk(sorted=False)'s."""
    ids, order = ids.sort(dim=-1)
    return weights.gather(1, order), ids


def assert_same_routing(actual, expected, *, ordered: bool) -> None:
    (w, ids), (w_ref, ids_ref) = actual, expected
    assert w.dtype == torch.float32 and ids.dtype == torch.int64
    if not ordered:
        (w, ids), (w_ref, ids_ref) = by_id(w, ids), by_id(w_ref, ids_ref)
    assert torch.equal(ids, ids_ref)
    # (a few ulps: torch's vectorised softmax sums in another order than one token's, more so on AVX-512)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)


def differs_for_some_token(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a.sort(dim=-1).values, b.sort(dim=-1).values)


# --- vectorised vs reference ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, renormalize, scaling_factor",
    [(1, 8, 2, True, 1.0), (37, 6, 3, False, 1.0), (64, 64, 8, True, 1.0), (9, 6, 1, True, 1.0),
     (50, 64, 6, False, 2.5), (20, 8, 8, True, 1.0), (33, 64, 1, False, 1.0)],
)
def test_softmax_topk_matches_reference(num_tokens, num_experts, top_k, renormalize, scaling_factor):
    torch.manual_seed(num_tokens * 100 + top_k)
    logits = torch.randn(num_tokens, num_experts) * 3
    config = RoutingConfig("softmax_topk", top_k, renormalize=renormalize, scaling_factor=scaling_factor)
    # The reference sorts best-first, as torch.topk(sorted=True) does, so the order must match too.
    assert_same_routing(route(logits, config), route_reference(logits, config), ordered=True)


@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(1, 8, 2), (37, 6, 3), (64, 128, 4), (9, 6, 1)])
def test_topk_softmax_matches_reference(num_tokens, num_experts, top_k):
    torch.manual_seed(num_tokens * 10 + top_k)
    logits = torch.randn(num_tokens, num_experts) * 3
    config = RoutingConfig("topk_softmax", top_k)
    assert_same_routing(route(logits, config), route_reference(logits, config), ordered=True)
    # the renormalised softmax over all E, up to rounding
    assert_same_routing(route(logits, config), route(logits, RoutingConfig("softmax_topk", top_k, True)), ordered=True)


GROUPED = [  # num_tokens, num_experts, num_groups, topk_group, top_k
    (64, 16, 4, 2, 4), (40, 64, 8, 4, 8), (31, 6, 3, 2, 3),
    (25, 8, 1, 1, 2), (48, 16, 4, 1, 4), (17, 64, 8, 3, 1),
]


@pytest.mark.parametrize("num_tokens, num_experts, num_groups, topk_group, top_k", GROUPED)
@pytest.mark.parametrize("renormalize", [True, False])
def test_sigmoid_group_topk_matches_reference(
    num_tokens, num_experts, num_groups, topk_group, top_k, renormalize
):
    torch.manual_seed(num_experts * 10 + top_k)
    logits = torch.randn(num_tokens, num_experts) * 2
    bias = torch.randn(num_experts)  # large next to sigmoid gaps: it changes the selection
    config = RoutingConfig("sigmoid_group_topk", top_k, renormalize, num_groups, topk_group, 2.5)
    weights, ids = route(logits, config, bias)
    assert_same_routing((weights, ids), route_reference(logits, config, bias), ordered=False)

    unbiased_ids = route(logits, config)[1]
    assert differs_for_some_token(ids, unbiased_ids), "bias too small to change any selection"
    # Weights are the *unbiased* sigmoid scores of the chosen experts.
    expected = torch.sigmoid(logits).gather(1, ids)
    if renormalize:
        expected = expected / expected.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(weights, expected * 2.5, rtol=0, atol=1e-6)
    if topk_group < num_groups and top_k > 1:  # with K=1 the best expert's group always stays
        ungrouped = RoutingConfig("sigmoid_group_topk", top_k, renormalize, 1, 1, scaling_factor=2.5)
        assert differs_for_some_token(ids, route(logits, ungrouped, bias)[1]), "group limit had no effect"


@pytest.mark.parametrize("num_tokens, num_experts, num_groups, topk_group, top_k", GROUPED)
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_group_limited_greedy_matches_reference(
    num_tokens, num_experts, num_groups, topk_group, top_k, renormalize
):
    torch.manual_seed(num_experts * 10 + top_k + 1)
    logits = torch.randn(num_tokens, num_experts) * 3
    config = RoutingConfig("softmax_group_limited_greedy", top_k, renormalize, num_groups, topk_group, 16.0)
    weights, ids = route(logits, config)
    assert_same_routing((weights, ids), route_reference(logits, config), ordered=False)
    if topk_group < num_groups and top_k > 1:  # with K=1 the best expert's group always stays
        ungrouped = RoutingConfig("softmax_group_limited_greedy", top_k, renormalize, 1, 1, 16.0)
        assert differs_for_some_token(ids, route(logits, ungrouped)[1]), "group limit had no effect"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_any_float_dtype_in_float32_out(dtype):
    torch.manual_seed(0)
    logits = torch.randn(16, 16).to(dtype)
    config = RoutingConfig("sigmoid_group_topk", 4, True, 4, 2)
    weights, ids = route(logits, config)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert_same_routing((weights, ids), route(logits.float(), config), ordered=True)


def test_empty_batch():
    for config in (RoutingConfig("softmax_topk", 2), RoutingConfig("sigmoid_group_topk", 2, True, 4, 2)):
        weights, ids = route(torch.empty(0, 16), config)
        assert weights.shape == ids.shape == (0, 2)


# --- against transformers' routers on the same weights ----------------------------------------------
# Finding (transformers 5.23, CPU): Mixtral/Qwen2/Qwen3/OLMoE call torch.topk(sorted=True), so ids come
# best-first; DeepSeek-V2/V3 call torch.topk(sorted=False), whose order is neither sorted nor by id
# (e.g. E=16, K=4 on CPU). Our kinds use the same flags on the same values, so the order matches HF's
# exactly and these tests compare ordered, no re-sorting. HF's default grouped_mm experts sum over K
# in this order, so it matters for bit-exact outputs.


def hf_routing(router: torch.nn.Module, num_tokens: int = 48, bias: bool = False):
    """Random gate weights (std 1, so routing is not degenerate) -> (our logits, HF's weights and ids)."""
    with torch.no_grad():
        router.weight.normal_(0.0, 1.0)
        if bias:
            router.e_score_correction_bias.normal_(0.0, 1.0)
        hidden = torch.randn(num_tokens, HIDDEN)
        hf_logits, hf_weights, hf_ids = router(hidden)
    logits = hidden @ router.weight.T  # [T, E], computed by us
    torch.testing.assert_close(logits, hf_logits)
    return logits, (hf_weights, hf_ids)


def test_mixtral_matches_hf():
    torch.manual_seed(1)
    router = MixtralTopKRouter(MixtralConfig(hidden_size=HIDDEN, num_local_experts=6, num_experts_per_tok=3))
    logits, expected = hf_routing(router)
    config = RoutingConfig("softmax_topk", 3, renormalize=True)  # Mixtral always renormalises
    assert_same_routing(route(logits, config), expected, ordered=True)


@pytest.mark.parametrize(
    "config_cls, router_cls",
    [(Qwen2MoeConfig, Qwen2MoeTopKRouter), (Qwen3MoeConfig, Qwen3MoeTopKRouter),
     (OlmoeConfig, OlmoeTopKRouter)],
)
@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("num_experts, top_k", [(8, 2), (6, 3), (64, 8)])
def test_softmax_families_match_hf(config_cls, router_cls, norm_topk_prob, num_experts, top_k):
    torch.manual_seed(2)
    hf_config = config_cls(
        hidden_size=HIDDEN, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob
    )
    logits, expected = hf_routing(router_cls(hf_config))
    config = RoutingConfig("softmax_topk", top_k, renormalize=norm_topk_prob)
    assert_same_routing(route(logits, config), expected, ordered=True)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize(
    "num_experts, n_group, topk_group, top_k", [(16, 4, 2, 4), (64, 8, 4, 8), (6, 3, 2, 3), (8, 1, 1, 2)]
)
def test_deepseek_v3_matches_hf(norm_topk_prob, num_experts, n_group, topk_group, top_k):
    torch.manual_seed(3)
    hf_config = DeepseekV3Config(
        hidden_size=HIDDEN, n_routed_experts=num_experts, num_experts_per_tok=top_k, n_group=n_group,
        topk_group=topk_group, norm_topk_prob=norm_topk_prob, routed_scaling_factor=2.5,
    )
    router = DeepseekV3TopkRouter(hf_config)
    logits, expected = hf_routing(router, bias=True)
    config = RoutingConfig("sigmoid_group_topk", top_k, norm_topk_prob, n_group, topk_group, 2.5)
    actual = route(logits, config, router.e_score_correction_bias)
    assert_same_routing(actual, expected, ordered=True)
    assert differs_for_some_token(actual[1], route(logits, config)[1])  # the bias was live


@pytest.mark.parametrize("norm_topk_prob", [True, False])  # HF 5.23's DeepSeek-V2 router ignores it
@pytest.mark.parametrize(
    "topk_method, num_experts, n_group, topk_group, top_k",
    [("greedy", 16, None, None, 4), ("greedy", 6, None, None, 3),
     ("group_limited_greedy", 16, 4, 2, 4), ("group_limited_greedy", 64, 8, 3, 6)],
)
def test_deepseek_v2_matches_hf(norm_topk_prob, topk_method, num_experts, n_group, topk_group, top_k):
    torch.manual_seed(4)
    hf_config = DeepseekV2Config(
        hidden_size=HIDDEN, n_routed_experts=num_experts, num_experts_per_tok=top_k, n_group=n_group,
        topk_group=topk_group, topk_method=topk_method, norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=16.0,
    )
    logits, expected = hf_routing(DeepseekV2TopkRouter(hf_config))
    # "greedy" is the group-limited kind with a single group (same topk call, same order as HF).
    config = RoutingConfig("softmax_group_limited_greedy", top_k, False, n_group or 1, topk_group or 1, 16.0)
    assert_same_routing(route(logits, config), expected, ordered=True)


# --- errors a user can cause -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="top1_sigmoid", top_k=2), r"kind='top1_sigmoid'"),
        (dict(kind="softmax_topk", top_k=0), r"top_k=0"),
        (dict(kind="sigmoid_group_topk", top_k=2, num_groups=0), r"num_groups=0"),
        (dict(kind="sigmoid_group_topk", top_k=2, num_groups=2, topk_group=3), r"topk_group=3"),
        (dict(kind="sigmoid_group_topk", top_k=2, num_groups=2, topk_group=0), r"topk_group=0"),
        (dict(kind="softmax_topk", top_k=2, num_groups=4), r"num_groups=4"),
        (dict(kind="softmax_topk", top_k=2, scaling_factor=0.0), r"scaling_factor=0.0"),
    ],
)
def test_bad_config_names_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoutingConfig(**kwargs)


@pytest.mark.parametrize(
    "config, logits_shape, bias, message",
    [
        (RoutingConfig("sigmoid_group_topk", 2, num_groups=3), (4, 16), None, r"num_groups=3.*E=16"),
        (RoutingConfig("softmax_topk", 9), (4, 8), None, r"top_k=9"),
        (RoutingConfig("sigmoid_group_topk", 5, num_groups=4, topk_group=1), (4, 16), None, r"top_k=5"),
        (RoutingConfig("sigmoid_group_topk", 2, num_groups=8, topk_group=2), (4, 8), None, r"num_groups=8"),
        (RoutingConfig("softmax_topk", 2), (4, 8), torch.zeros(8), r"kind='softmax_topk'.*correction_bias"),
        (RoutingConfig("sigmoid_group_topk", 2), (4, 8), torch.zeros(7), r"correction_bias.*\(8,\)"),
        (RoutingConfig("softmax_topk", 2), (8,), None, r"\[T, E\]"),
    ],
)
def test_config_that_does_not_fit_the_logits(config, logits_shape, bias, message):
    with pytest.raises(ValueError, match=message):
        route(torch.randn(*logits_shape), config, bias)


@pytest.mark.parametrize("num_experts, top_k", [(8, 2), (6, 3), (32, 4)])
def test_gpt_oss_matches_hf(num_experts, top_k):
    """GPT-OSS's router has a bias: the logits here include it, as MoEBlock adds it."""
    torch.manual_seed(5)
    router = GptOssTopKRouter(GptOssConfig(hidden_size=HIDDEN, num_local_experts=num_experts, num_experts_per_tok=top_k))
    with torch.no_grad():
        router.weight.normal_(0.0, 1.0)
        router.bias.normal_(0.0, 1.0)
        hidden = torch.randn(48, HIDDEN)
        hf_logits, hf_weights, hf_ids = router(hidden)
    logits = torch.nn.functional.linear(hidden, router.weight, router.bias)
    torch.testing.assert_close(logits, hf_logits)
    assert_same_routing(route(logits, RoutingConfig("topk_softmax", top_k)), (hf_weights, hf_ids), ordered=True)
