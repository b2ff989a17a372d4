"""CheckpointReader and load_experts on checkpoints saved by transformers and on hand-written fused and broken files."""

import contextlib
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import moeray.models.checkpoint as checkpoint
from moeray.models.checkpoint import CheckpointError, CheckpointReader, load_expert_biases, load_experts, read_config

H, I, E = 32, 48, 6  # the tiny Mixtral below


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A tiny random Mixtral saved with save_pretrained -> (folder, model)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=101, hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=3,
    )
    model = transformers.MixtralForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def qwen_sharded(tmp_path_factory):
    """A tiny random Qwen2-MoE saved in many small shards -> (folder, model)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.Qwen2MoeConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=6, num_experts_per_tok=2,
    )
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("qwen")
    model.save_pretrained(folder, max_shard_size="20KB")
    return folder, model


def fused_checkpoint(folder, dtype=torch.float32, prefix="model.layers.0.mlp"):
    """A one-layer fused-expert checkpoint with distinct values everywhere -> (gate_up [E, 2I, H], down [E, H, I])."""
    gate_up = torch.randn(E, 2 * I, H).to(dtype)
    down = torch.randn(E, H, I).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {f"{prefix}.experts.gate_up_proj": gate_up, f"{prefix}.experts.down_proj": down,
         f"{prefix}.gate.weight": torch.randn(E, H).to(dtype)},
        str(folder / "model.safetensors"),
    )
    return gate_up, down


def per_expert_checkpoint(folder, dtype, names=("w1", "w3", "w2"), prefix="model.layers.0.block_sparse_moe"):
    """A one-layer per-expert checkpoint -> (gate_up [E, 2I, H], down [E, H, I]) as the model would hold them."""
    gate_up = torch.randn(E, 2 * I, H).to(dtype)
    down = torch.randn(E, H, I).to(dtype)
    gate, up, dn = names
    tensors = {}
    for e in range(E):
        tensors[f"{prefix}.experts.{e}.{gate}.weight"] = gate_up[e, :I].clone()
        tensors[f"{prefix}.experts.{e}.{up}.weight"] = gate_up[e, I:].clone()
        tensors[f"{prefix}.experts.{e}.{dn}.weight"] = down[e].clone()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return gate_up, down


@contextlib.contextmanager
def raises_naming(*parts):
    """Expect a CheckpointError whose message contains every one of `parts`."""
    with pytest.raises(CheckpointError) as info:
        yield
    missing = [part for part in parts if part not in str(info.value)]
    assert not missing, f"{missing} not in: {info.value}"


def data_order(file):
    """Tensor names of a safetensors file in the order of their data."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


@pytest.fixture
def reads(monkeypatch):
    """Record every tensor access the reader makes: ('tensor', name) or ('rows', name, start, stop)."""
    log = []
    real_open = checkpoint.safe_open

    class Slice:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def __getitem__(self, key):
            assert isinstance(key, slice) and key.step is None, key
            log.append(("rows", self.name, key.start, key.stop))
            return self.inner[key]

    class Handle:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def get_tensor(self, name):
            log.append(("tensor", name))
            return self.inner.get_tensor(name)

        def get_slice(self, name):
            return Slice(name, self.inner.get_slice(name))

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(checkpoint, "safe_open", Handle)
    return log


# --- real transformers checkpoints ---------------------------------------------------------


def test_mixtral_save_pretrained_writes_per_expert_w1_w2_w3(mixtral):
    folder, _ = mixtral
    with CheckpointReader(folder) as reader:
        assert reader.shape("model.layers.0.block_sparse_moe.experts.5.w1.weight") == (I, H)
        assert reader.shape("model.layers.0.block_sparse_moe.experts.5.w2.weight") == (H, I)
        assert not reader.has("model.layers.0.mlp.experts.gate_up_proj")


@pytest.mark.parametrize("layer", [0, 1])
def test_mixtral_subset_matches_model_in_memory(mixtral, layer, reads):
    folder, model = mixtral
    experts = model.model.layers[layer].mlp.experts
    with CheckpointReader(folder) as reader:
        w13, w2 = load_experts(reader, f"model.layers.{layer}.block_sparse_moe", [4, 1], H, I, E, torch.float32)
    assert w13.shape == (2, 2 * I, H) and w2.shape == (2, H, I)
    assert w13.is_contiguous() and w2.is_contiguous()
    assert torch.equal(w13, experts.gate_up_proj.detach()[[4, 1]])
    assert torch.equal(w2, experts.down_proj.detach()[[4, 1]])
    # Only experts 4 and 1 were read.
    read_experts = {r[1].split(".experts.")[1].split(".")[0] for r in reads}
    assert read_experts == {"4", "1"}


def test_qwen2_moe_sharded_subset_matches_model_in_memory(qwen_sharded):
    folder, model = qwen_sharded
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    with CheckpointReader(folder) as reader:
        assert reader.has("model.layers.1.mlp.experts.5.gate_proj.weight")
        for layer in (0, 1):
            experts = model.model.layers[layer].mlp.experts
            ids = [5, 0, 3]
            w13, w2 = load_experts(reader, f"model.layers.{layer}.mlp", ids, 32, 24, 6, torch.float32)
            assert torch.equal(w13, experts.gate_up_proj.detach()[ids])
            assert torch.equal(w2, experts.down_proj.detach()[ids])
        assert torch.equal(reader.get("model.norm.weight"), model.model.norm.weight.detach())
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert reader.names == frozenset(index["weight_map"])


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """A tiny random GPT-OSS saved with save_pretrained (fused, transposed, interleaved experts) -> (folder, model)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.GptOssConfig(
        vocab_size=101, hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=E, num_experts_per_tok=2)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # transformers initialises the biases to 0
            layer.mlp.experts.gate_up_proj_bias.normal_()
            layer.mlp.experts.down_proj_bias.normal_()
    folder = tmp_path_factory.mktemp("gpt_oss")
    model.save_pretrained(folder)
    return folder, model


def test_gpt_oss_subset_is_deinterleaved_and_transposed(gpt_oss, reads):
    """Experts 4 and 1 of each layer: w13's gate rows are transformers' even gate_up columns and its up
    rows the odd ones (`_apply_gate`'s [..., ::2] and [..., 1::2]), biases the same way; only those
    experts' rows are read."""
    folder, model = gpt_oss
    ids = [4, 1]
    with CheckpointReader(folder) as reader:
        for layer in (0, 1):
            experts = model.model.layers[layer].mlp.experts
            prefix = f"model.layers.{layer}.mlp"
            w13, w2 = load_experts(reader, prefix, ids, H, I, E, torch.float32, "gpt_oss")
            b13, b2 = load_expert_biases(reader, prefix, ids, H, I, E, torch.float32)
            gate_up, bias = experts.gate_up_proj.detach()[ids], experts.gate_up_proj_bias.detach()[ids]  # [2, H, 2I]
            assert w13.shape == (2, 2 * I, H) and w13.is_contiguous() and w2.is_contiguous()
            assert torch.equal(w13[:, :I], gate_up[..., ::2].transpose(1, 2))
            assert torch.equal(w13[:, I:], gate_up[..., 1::2].transpose(1, 2))
            assert torch.equal(w2, experts.down_proj.detach()[ids].transpose(1, 2))
            assert torch.equal(b13, torch.cat([bias[:, ::2], bias[:, 1::2]], dim=1))
            assert torch.equal(b2, experts.down_proj_bias.detach()[ids])
        with raises_naming("model.safetensors: tensor 'model.layers.0.mlp.experts.gate_up_proj'",
                           f"has shape [6, {H}, {2 * I}], expected [6, {2 * I}, {H}]"):
            load_experts(reader, "model.layers.0.mlp", [0], 2 * I, H // 2, E, torch.float32, "gpt_oss")
    rows = {row for kind, n, start, stop in reads if n.endswith("experts.gate_up_proj") for row in range(start, stop)}
    assert rows == {1, 4}


def test_read_config(mixtral):
    folder, model = mixtral
    config = read_config(folder)
    assert config["num_local_experts"] == E and config["hidden_size"] == H
    assert read_config(folder / "config.json") == config


# --- fused naming, row reads ---------------------------------------------------------------


def test_fused_subset_reads_only_requested_rows(tmp_path, reads):
    gate_up, down = fused_checkpoint(tmp_path)
    ids = [3, 0, 3, 5]
    with CheckpointReader(tmp_path) as reader:
        assert reads == []  # opening reads no tensor data
        w13, w2 = load_experts(reader, "model.layers.0.mlp", ids, H, I, E, torch.float32)
    assert torch.equal(w13, gate_up[ids]) and torch.equal(w2, down[ids])
    assert w13.is_contiguous() and w2.is_contiguous()
    assert not [r for r in reads if r[0] == "tensor"]
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        rows = {row for kind, n, start, stop in reads if n == name for row in range(start, stop)}
        assert rows == {0, 3, 5}


def test_get_rows_order_repeats_and_runs(tmp_path, reads):
    table = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)
    save_file({"table": table}, str(tmp_path / "model.safetensors"))
    with CheckpointReader(tmp_path) as reader:
        rows = [7, 2, 3, 7, 4, 30, 2]
        assert torch.equal(reader.get_rows("table", rows), table[rows])
        # Consecutive rows are one read each run: 2..4, 7, 30.
        assert sorted((start, stop) for _, _, start, stop in reads) == [(2, 5), (7, 8), (30, 31)]
        assert torch.equal(reader.get_rows("table", [39, 0]), table[[39, 0]])
        empty = reader.get_rows("table", [])
        assert empty.shape == (0, 3) and empty.dtype == torch.float32
        assert reader.get_rows("table", [1], dtype=torch.bfloat16).dtype == torch.bfloat16
        with pytest.raises(ValueError, match=r"rows \[40\]"):
            reader.get_rows("table", [1, 40])


# --- dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")])
def test_bf16_checkpoint_read_as_fp32(tmp_path, names):
    gate_up, down = per_expert_checkpoint(tmp_path, torch.bfloat16, names)
    with CheckpointReader(tmp_path) as reader:
        w13, w2 = load_experts(reader, "model.layers.0.block_sparse_moe", [2, 5], H, I, E, torch.float32)
        assert reader.get("model.layers.0.block_sparse_moe.experts.0." + names[0] + ".weight").dtype == torch.bfloat16
    assert w13.dtype == torch.float32 and w2.dtype == torch.float32
    assert torch.equal(w13, gate_up[[2, 5]].float()) and torch.equal(w2, down[[2, 5]].float())


def test_fp32_checkpoint_read_as_bf16(tmp_path):
    gate_up, down = fused_checkpoint(tmp_path, torch.float32)
    with CheckpointReader(tmp_path) as reader:
        w13, w2 = load_experts(reader, "model.layers.0.mlp", [1], H, I, E, torch.bfloat16)
        gate = reader.get("model.layers.0.mlp.gate.weight", dtype=torch.bfloat16)
    assert w13.dtype == torch.bfloat16 and gate.dtype == torch.bfloat16
    assert torch.equal(w13, gate_up[[1]].bfloat16()) and torch.equal(w2, down[[1]].bfloat16())


# --- errors --------------------------------------------------------------------------------


def test_index_naming_missing_shard(tmp_path):
    save_file({"a.weight": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*'b\.weight'"):
        CheckpointReader(tmp_path)


def test_index_naming_tensor_absent_from_shard(tmp_path):
    save_file({"a.weight": torch.zeros(2)}, str(tmp_path / "shard.safetensors"))
    index = {"weight_map": {"a.weight": "shard.safetensors", "ghost.weight": "shard.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard\.safetensors: tensor 'ghost\.weight' not found"):
        CheckpointReader(tmp_path)


def test_malformed_index_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        CheckpointReader(tmp_path)


def test_shard_truncated_in_tensor_data(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"first.weight": torch.randn(64, 64), "second.weight": torch.randn(64, 64)}, str(file))
    first, last = data_order(file)
    file.write_bytes(file.read_bytes()[:-100])  # cut into the last tensor's data only
    with pytest.raises(CheckpointError) as info:
        CheckpointReader(tmp_path)
    assert "model.safetensors" in str(info.value) and repr(last) in str(info.value)
    assert repr(first) not in str(info.value)


def test_shard_truncated_after_reader_opened(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read tensor 'w'"):
        reader.get("w")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read tensor 'w'"):
        reader.get_rows("w", [0])
    reader.close()


@pytest.mark.parametrize(
    "content",
    [b"this is not a safetensors file, just some garbage bytes", b"\x05\x00", struct.pack("<Q", 9) + b"{not json"],
    ids=["garbage", "too-short", "bad-json"],
)
def test_not_a_safetensors_file(tmp_path, content):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a safetensors file"):
        CheckpointReader(tmp_path)


def test_missing_tensor(tmp_path):
    fused_checkpoint(tmp_path)
    with CheckpointReader(tmp_path) as reader:
        with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'lm_head\.weight' not found"):
            reader.get("lm_head.weight")
        with pytest.raises(CheckpointError, match=r"'lm_head\.weight' not found"):
            reader.shape("lm_head.weight")


def test_missing_expert_is_named(tmp_path):
    gate_up, _ = per_expert_checkpoint(tmp_path, torch.float32)
    file = tmp_path / "model.safetensors"
    with CheckpointReader(tmp_path) as reader:
        kept = {n: reader.get(n) for n in reader.names if n != "model.layers.0.block_sparse_moe.experts.4.w3.weight"}
    save_file(kept, str(file))
    with CheckpointReader(tmp_path) as reader:
        w13, _ = load_experts(reader, "model.layers.0.block_sparse_moe", [3], H, I, E, torch.float32)
        assert torch.equal(w13, gate_up[[3]])
        with raises_naming("model.safetensors: tensor 'model.layers.0.block_sparse_moe.experts.4.w3.weight' not found"):
            load_experts(reader, "model.layers.0.block_sparse_moe", [3, 4], H, I, E, torch.float32)


def test_wrong_shape(tmp_path):
    per_expert_checkpoint(tmp_path, torch.float32)
    name = "model.layers.0.block_sparse_moe.experts.0.w2.weight"
    with CheckpointReader(tmp_path) as reader:
        with raises_naming(f"model.safetensors: tensor '{name}' has shape [32, 48], expected [48, 32]"):
            reader.get(name, shape=(I, H))
        with raises_naming("model.safetensors", "experts.0.w1.weight' has shape [48, 32], expected [40, 32]"):
            load_experts(reader, "model.layers.0.block_sparse_moe", [0], H, 40, E, torch.float32)


def test_wrong_shape_fused(tmp_path):
    fused_checkpoint(tmp_path)
    with CheckpointReader(tmp_path) as reader:
        with raises_naming("model.safetensors: tensor 'model.layers.0.mlp.experts.gate_up_proj'",
                           "has shape [6, 96, 32], expected [8, 96, 32]"):
            load_experts(reader, "model.layers.0.mlp", [0], H, I, 8, torch.float32)


def test_no_expert_naming_scheme_matches(tmp_path):
    fused_checkpoint(tmp_path)
    with CheckpointReader(tmp_path) as reader:
        with pytest.raises(CheckpointError) as info:
            load_experts(reader, "model.layers.0.block_sparse_moe", [0], H, I, E, torch.float32)
    message = str(info.value)
    assert "'model.layers.0.block_sparse_moe'" in message
    for probe in ("experts.0.w1.weight", "experts.0.gate_proj.weight", "experts.gate_up_proj"):
        assert f"model.layers.0.block_sparse_moe.{probe}" in message


@pytest.mark.parametrize("bad", [6, -1])
def test_expert_id_out_of_range(tmp_path, bad):
    fused_checkpoint(tmp_path)
    with CheckpointReader(tmp_path) as reader:
        with pytest.raises(ValueError, match=rf"expert id {bad} .*num_experts=6") as info:
            load_experts(reader, "model.layers.0.mlp", [0, bad], H, I, E, torch.float32)
    assert not isinstance(info.value, CheckpointError)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        CheckpointReader(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        CheckpointReader(tmp_path)


def test_config_missing_or_malformed(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: config file not found"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{'model_type': 'mixtral'")
    with pytest.raises(CheckpointError, match=r"config\.json: not a valid JSON config"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object"):
        read_config(tmp_path)


def test_closed_reader_refuses_reads(tmp_path):
    fused_checkpoint(tmp_path)
    with CheckpointReader(tmp_path) as reader:
        reader.get("model.layers.0.mlp.gate.weight")
    with pytest.raises(ValueError, match="closed"):
        reader.get("model.layers.0.mlp.gate.weight")
