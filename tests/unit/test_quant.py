"""Block-wise FP8 checkpoints (models.quant): dequantization against a per-element reference, reads of
stacked experts, and the errors a broken FP8 checkpoint gives; MXFP4 (GPT-OSS) against transformers'
own dequantization. Whole models against transformers: the `deepseek_v3_fp8` and `gpt_oss_mxfp4`
checkpoints in test_models.py and test_cluster.py."""

import json
import shutil

import pytest
import torch
from checkpoints import quantize_fp8, quantize_mxfp4
from safetensors.torch import load_file, save_file

from moeray.models import load_model
from moeray.models.checkpoint import CheckpointError, CheckpointReader, load_experts
from moeray.models.quant import Fp8Weights, dequantize, dequantize_mxfp4


def test_dequantize_cut_short_blocks_match_each_element():
    """40 x 26 in blocks of 16 x 10: the last block row is 8 tall, the last block column 6 wide."""
    weight = torch.randn(40, 26, generator=torch.Generator().manual_seed(0)) * 3
    q, scale_inv = quantize_fp8(weight, (16, 10))
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 3)
    got = dequantize(q, scale_inv, (16, 10))
    expected = torch.tensor([[q[r, c].item() * scale_inv[r // 16, c // 10].item() for c in range(26)] for r in range(40)])
    assert torch.equal(got, expected)
    assert (got - weight).abs().max() <= weight.abs().max() / 8  # e4m3: 3 mantissa bits, a real quantization
    assert not torch.equal(dequantize(q, scale_inv.t().contiguous()[:3, :3], (16, 10)), got)  # the scales matter


def test_one_scale_per_tensor():
    q = torch.tensor([[1.0, -2.0], [0.5, 448.0]]).to(torch.float8_e4m3fn)
    assert torch.equal(dequantize(q, torch.tensor([0.25]), None), torch.tensor([[0.25, -0.5], [0.125, 112.0]]))


def fp8_experts(tmp_path, block=(8, 16), E=4, H=32, I=24, scale_dtype=torch.float32):
    """A fused-layout MoE layer in FP8 -> (folder, float32 gate_up [E, 2I, H], down [E, H, I] as dequantized).
    Scales rounded up to powers of two where stored as float8_e8m0fnu (`scale_fmt: ue8m0`)."""
    gen = torch.Generator().manual_seed(1)
    tensors, full = {}, {}
    for name, shape in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
        parts = [quantize_fp8(torch.randn(shape, generator=gen), block) for _ in range(E)]
        if scale_dtype == torch.float8_e8m0fnu:
            parts = [(q, torch.exp2(torch.ceil(torch.log2(s)))) for q, s in parts]
        tensors[f"m.experts.{name}"] = torch.stack([q for q, _ in parts])
        tensors[f"m.experts.{name}_scale_inv"] = torch.stack([s for _, s in parts]).to(scale_dtype)
        full[name] = torch.stack([dequantize(q, s, block) for q, s in parts])
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path, full["gate_up_proj"], full["down_proj"]


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float8_e8m0fnu])
def test_fp8_fused_experts_subset_reads_their_scales(tmp_path, scale_dtype):
    folder, gate_up, down = fp8_experts(tmp_path, scale_dtype=scale_dtype)
    with CheckpointReader(folder, Fp8Weights((8, 16))) as reader:
        w13, w2 = load_experts(reader, "m", [3, 1, 3], 32, 24, 4, torch.bfloat16)
    assert torch.equal(w13, gate_up[[3, 1, 3]].to(torch.bfloat16)) and torch.equal(w2, down[[3, 1, 3]].to(torch.bfloat16))


def test_fused_gate_up_whose_halves_share_a_scale_block_is_refused(tmp_path):
    """I = 20 in blocks of 8 rows: rows 16..23 of gate_up hold gate and up rows under one scale."""
    folder, _, _ = fp8_experts(tmp_path, I=20)
    with CheckpointReader(folder, Fp8Weights((8, 16))) as reader, pytest.raises(
            CheckpointError, match="I=20 not a multiple of the 8-row scale blocks"):
        load_experts(reader, "m", [0], 32, 20, 4, torch.float32)


def test_one_scale_per_tensor_in_a_checkpoint(tmp_path):
    """`weight_block_size: null`: each float8 weight has one scale."""
    q = (torch.randn(6, 10) * 50).to(torch.float8_e4m3fn)
    save_file({"w.weight": q, "w.weight_scale_inv": torch.tensor([0.125])}, tmp_path / "model.safetensors")
    with CheckpointReader(tmp_path, Fp8Weights(None)) as reader:
        assert torch.equal(reader.get("w.weight"), q.float() * 0.125)


def test_float8_without_fp8_config_is_named(tmp_path):
    folder, _, _ = fp8_experts(tmp_path)
    with CheckpointReader(folder) as reader, pytest.raises(
            CheckpointError, match=r"'m.experts.down_proj' is float8_e4m3fn, but config.json has no quantization_config"):
        reader.get("m.experts.down_proj")


def test_missing_or_misshapen_scales_are_named(tmp_path):
    q, s = quantize_fp8(torch.randn(20, 12), (8, 8))  # scales [3, 2]
    save_file({"a.weight": q, "b.weight": q.clone(), "b.weight_scale_inv": s.t().contiguous()}, tmp_path / "model.safetensors")
    with CheckpointReader(tmp_path, Fp8Weights((8, 8))) as reader:
        with pytest.raises(CheckpointError, match=r"'a.weight' is float8 but its scales 'a.weight_scale_inv' are missing"):
            reader.get("a.weight")
        with pytest.raises(CheckpointError, match=r"'b.weight_scale_inv' has shape \[2, 3\], expected \[3, 2\] for "
                                                  r"'b.weight' \[20, 12\] in blocks of \(8, 8\) \(config.json: "
                                                  r"quantization_config.weight_block_size"):
            reader.get("b.weight")
        with pytest.raises(CheckpointError, match="rows of float8 tensor 'b.weight' .* share scales"):
            reader.get_rows("b.weight", [0])


def test_per_tensor_fp8_export_is_named(tmp_path):
    """AutoFP8-style checkpoints also say quant_method 'fp8', but scale each tensor once (weight_scale)."""
    q = torch.randn(8, 8).to(torch.float8_e4m3fn)
    save_file({"a.weight": q, "a.weight_scale": torch.tensor(0.5)}, tmp_path / "model.safetensors")
    with CheckpointReader(tmp_path, Fp8Weights((128, 128))) as reader, pytest.raises(
            CheckpointError, match=r"'a.weight' has a per-tensor scale \(weight_scale, as AutoFP8 writes\)"):
        reader.get("a.weight")


def test_power_of_two_scales_stored_as_e8m0():
    """`scale_fmt: ue8m0` checkpoints store each scale as a bare exponent (float8_e8m0fnu)."""
    q, _ = quantize_fp8(torch.randn(16, 16), (8, 8))
    scales = torch.tensor([[0.25, 4.0], [1.0, 2.0**-20]])
    assert torch.equal(dequantize(q, scales.to(torch.float8_e8m0fnu), (8, 8)), dequantize(q, scales, (8, 8)))


def test_sharded_fp8_checkpoint_with_scales_in_other_shards(make_checkpoint, tmp_path):
    """Hub FP8 checkpoints come in many shards; a weight's scales may sit in another shard than the weight.
    The model loads to the same bits as from the single file."""
    single = make_checkpoint("deepseek_v3_fp8")
    tensors = load_file(single / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    first, second = shards.values()
    for name in names:  # scales in the second shard, their weights and everything else in the first
        (second if name.endswith("_scale_inv") else first)[name] = tensors[name]
    folder = tmp_path / "sharded"
    folder.mkdir()
    for file, part in shards.items():
        save_file(part, folder / file, metadata={"format": "pt"})
    weight_map = {name: file for file, part in shards.items() for name in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(single / "config.json", folder / "config.json")
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_model(folder)(ids), load_model(single)(ids))


def test_mxfp4_matches_transformers_dequantization():
    """Random bytes and exponents (both nibbles, both signs, scales from 2^-20 to 2^8) widen to
    transformers' values exactly (its `convert_moe_packed_tensors`, which also transposes the last two dims)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=gen, dtype=torch.uint8)  # [E, R, G, 16]
    scales = torch.randint(107, 136, (3, 10, 4), generator=gen, dtype=torch.uint8)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)  # [E, R, 128]
    assert torch.equal(dequantize_mxfp4(blocks, scales), expected)


def test_mxfp4_test_quantizer_round_trips_fp4_numbers_and_rounds_others():
    """The test checkpoints' quantizer (checkpoints.quantize_mxfp4): values already on the FP4 grid of their
    block come back exactly, others within one grid step (FP4's steps are 0.5 to 2 times the block's scale)."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 64, generator=gen) * 3
    blocks, scales = quantize_mxfp4(weight)
    assert blocks.shape == (5, 2, 16) and scales.shape == (5, 2)
    widened = dequantize_mxfp4(blocks, scales)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)  # the block's scale: FP4 steps are 0.5-2 of it
    assert ((widened - weight).abs() <= step).all() and not torch.equal(widened, weight)
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(widened)), widened)


def test_mxfp4_experts_of_a_checkpoint_read_only_their_rows(make_checkpoint):
    """Experts 5 and 2 of the MXFP4 GPT-OSS checkpoint are the same numbers as all experts read, rows 5 and 2."""
    folder = make_checkpoint("gpt_oss_mxfp4")
    with CheckpointReader(folder) as reader:
        args = ("model.layers.1.mlp", 64, 32, 6, torch.float32, "gpt_oss_mxfp4")
        w13, w2 = load_experts(reader, args[0], [5, 2], *args[1:])
        all13, all2 = load_experts(reader, args[0], range(6), *args[1:])
        assert torch.equal(w13, all13[[5, 2]]) and torch.equal(w2, all2[[5, 2]])
        assert w13.shape == (2, 64, 64) and w2.shape == (2, 64, 32)
        with pytest.raises(CheckpointError, match=r"experts.gate_up_proj_blocks' has shape \[6, 64, 2, 16\], expected \[6, 128, 2, 16\]"):
            load_experts(reader, args[0], [0], 64, 64, 6, torch.float32, "gpt_oss_mxfp4")
