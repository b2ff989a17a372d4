"""Read Hugging Face safetensors checkpoints, down to a subset of one layer's experts.

An expert group holds only its own slots, so it must be able to load expert 4 and expert 1
of layer 3 without reading the other experts' bytes (a Mixtral-8x22B layer is ~4.5 GB of
experts). `CheckpointReader` maps tensor names to shard files from the safetensors headers
alone; tensors are read on demand through `safe_open`'s memory map, and `get_rows` reads
only the requested rows of dim 0.

Checkpoint folder: either `model.safetensors` (one file) or `model.safetensors.index.json`
(`{"weight_map": {tensor_name: shard_file}}`) beside its shards; `model.safetensors` wins
when both exist, as in transformers.

Routed experts are stored under one of three naming schemes (`P` is the MoE block's
prefix, e.g. `model.layers.3.block_sparse_moe` or `model.layers.3.mlp`; `E` experts,
`H` hidden, `I` expert intermediate):

1. Mixtral, one tensor per expert and projection (what Mixtral checkpoints on the Hub and
   transformers 5's `save_pretrained` write)::

       P.experts.{e}.w1.weight   [I, H]   gate
       P.experts.{e}.w3.weight   [I, H]   up
       P.experts.{e}.w2.weight   [H, I]   down

2. Qwen-MoE / OLMoE / DeepSeek, one tensor per expert and projection::

       P.experts.{e}.gate_proj.weight   [I, H]
       P.experts.{e}.up_proj.weight     [I, H]
       P.experts.{e}.down_proj.weight   [H, I]

3. Fused, transformers 5's in-memory layout (`MixtralExperts`), also saved by some tools::

       P.experts.gate_up_proj   [E, 2I, H]   rows [0, I) gate, rows [I, 2I) up
       P.experts.down_proj      [E, H, I]

   (`gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)`.)

4. GPT-OSS, fused and transposed, gate and up columns interleaved, with biases (the family says so:
   `ModelConfig.expert_layout` "gpt_oss")::

       P.experts.gate_up_proj        [E, H, 2I]   columns 0, 2, 4... gate, 1, 3, 5... up
       P.experts.gate_up_proj_bias   [E, 2I]      interleaved the same way
       P.experts.down_proj           [E, I, H]
       P.experts.down_proj_bias      [E, H]

   or, as the Hub's GPT-OSS releases ship it ("gpt_oss_mxfp4"), the two weights as MXFP4 blocks of 32
   (`models.quant.dequantize_mxfp4`), not transposed: `P.experts.gate_up_proj_blocks [E, 2I, H/32, 16]`
   (uint8, two values a byte) with `P.experts.gate_up_proj_scales [E, 2I, H/32]` (uint8 exponents),
   gate and up rows interleaved, and `P.experts.down_proj_blocks [E, H, I/32, 16]`, `..._scales [E, H, I/32]`.

`load_experts` returns all four as the fused pair `w13 [n, 2I, H]`, `w2 [n, H, I]`, the
layout the expert FFN kernels take, and `load_expert_biases` GPT-OSS's biases as `b13 [n, 2I]`
(gate, then up) and `b2 [n, H]`.

Block-wise FP8 checkpoints (`models.quant`) are read through the same calls: a float8 tensor
`X` comes back widened with its scales `X_scale_inv` (only the rows asked for of both).
"""

from __future__ import annotations

import json
import math
import operator
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from moeray.models.quant import FLOAT8, MXFP4_BLOCK, SCALE_DTYPES, Fp8Weights, dequantize, dequantize_mxfp4, scale_shape

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# safetensors refuses headers above 100 MB; a larger length means the file is not safetensors.
_MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A missing, truncated or mismatched checkpoint file; the message names the file and, where known, the tensor."""


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lives, from its shard's header."""

    file: Path
    shape: tuple[int, ...]


class CheckpointReader:
    """Lazy, name-addressed access to the tensors of one checkpoint folder.

    The constructor reads only the safetensors headers, so a corrupt or truncated shard is
    reported before any weights are loaded (an expert group should fail at start, not at its
    first migration). Shards are memory-mapped on first use; `close` releases them.
    Safe to share between threads (staging loads run beside the serve loop). `fp8`: how the
    checkpoint's float8 weights are scaled (its config's `quantization_config`); without it a
    float8 tensor is an error.
    """

    def __init__(self, path: str | Path, fp8: Fp8Weights | None = None):
        self.path, self.fp8 = Path(path), fp8
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint folder does not exist")
        single, index = self.path / SINGLE_FILE, self.path / INDEX_FILE
        if single.is_file():
            self._listing = single  # the file that says which tensors exist
            self._entries = {name: _Entry(single, shape) for name, shape in _read_header(single).items()}
        elif index.is_file():
            self._listing = index
            self._entries = _read_index(index)
        else:
            raise CheckpointError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        self._names = frozenset(self._entries)
        self._handles: dict[Path, object] = {}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def names(self) -> frozenset[str]:
        return self._names

    def has(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape from its header; reads no data."""
        return self._entry(name).shape

    def get(self, name: str, dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None) -> Tensor:
        """The whole tensor, converted to `dtype` if given; `shape` is checked before any data is read."""
        entry = self._entry(name)
        if shape is not None:
            self._check_shape(name, tuple(shape))
        tensor = self._read(entry, name, lambda handle: handle.get_tensor(name))
        if tensor.dtype in FLOAT8:
            tensor = self._dequantize(name, tensor, lambda scale: self.get(scale))
        return tensor if dtype is None else tensor.to(dtype)

    def get_rows(self, name: str, rows: Sequence[int], dtype: torch.dtype | None = None) -> Tensor:
        """Rows `rows` of dim 0, in that order (repeats allowed) -> [len(rows), *shape[1:]].

        Reads each run of consecutive requested rows with one slice of the memory map, so
        the bytes of the other rows are never touched.
        """
        entry = self._entry(name)
        if not entry.shape:
            raise ValueError(f"{entry.file}: tensor {name!r} is a scalar; it has no rows")
        rows = [operator.index(r) for r in rows]
        num_rows = entry.shape[0]
        bad = [r for r in rows if not 0 <= r < num_rows]
        if bad:
            raise ValueError(f"{entry.file}: tensor {name!r} has {num_rows} rows; rows {bad} are out of range")
        unique = sorted(set(rows))
        runs = _runs(unique) or [(0, 0)]  # an empty request still reads a [0, ...] slice for the dtype

        def read(handle) -> Tensor:
            view = handle.get_slice(name)
            return torch.cat([view[start:stop] for start, stop in runs])

        block = self._read(entry, name, read)  # [len(unique), ...]
        if block.dtype in FLOAT8:  # (rows of a stack, experts: their scales are the same rows of the scales')
            if len(entry.shape) < 3:
                raise CheckpointError(f"{entry.file}: rows of float8 tensor {name!r} {list(entry.shape)} share scales; "
                                      "read it whole")
            block = self._dequantize(name, block, lambda scale: self.get_rows(scale, unique))
        position = {row: i for i, row in enumerate(unique)}
        out = block[[position[r] for r in rows]] if rows != unique else block
        out = out if dtype is None else out.to(dtype)
        return out.contiguous()

    def close(self) -> None:
        """Release the memory maps; the reader cannot be used afterwards."""
        with self._lock:
            for handle in self._handles.values():
                handle.__exit__(None, None, None)
            self._handles.clear()
            self._closed = True

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self._names)} tensors)"

    def _dequantize(self, name: str, weight: Tensor, read_scale) -> Tensor:
        """A float8 tensor (or rows of one) -> float32, with its `_scale_inv` (`read_scale(scale_name)`)."""
        where = self._entry(name).file
        if self.fp8 is None:
            raise CheckpointError(f"{where}: tensor {name!r} is {str(weight.dtype).removeprefix('torch.')}, but "
                                  "config.json has no quantization_config with quant_method 'fp8'")
        scale_name = f"{name}_scale_inv"
        if not self.has(scale_name):
            if self.has(f"{name}_scale"):
                raise CheckpointError(f"{where}: tensor {name!r} has a per-tensor scale (weight_scale, as AutoFP8 writes); "
                                      "only block-wise FP8 (weight_scale_inv, as DeepSeek-V3 and Qwen3-FP8) is supported")
            raise CheckpointError(f"{where}: tensor {name!r} is float8 but its scales {scale_name!r} are missing")
        if weight.dim() < 2:
            raise CheckpointError(f"{where}: float8 tensor {name!r} has shape {list(weight.shape)}; weights have 2 dims or more")
        full, found, block = self.shape(name), self.shape(scale_name), self.fp8.block
        expected = "one scale" if block is None else list(scale_shape(full, block))
        fits = math.prod(found) == 1 if block is None else list(found) == expected
        if not fits:
            raise CheckpointError(f"{self._entry(scale_name).file}: tensor {scale_name!r} has shape {list(found)}, "
                                  f"expected {expected} for {name!r} {list(full)} "
                                  f"in blocks of {block} (config.json: quantization_config.weight_block_size, "
                                  "[128, 128] where absent)")
        scale = read_scale(scale_name)
        if scale.dtype not in SCALE_DTYPES:
            raise CheckpointError(f"{self._entry(scale_name).file}: tensor {scale_name!r} is {scale.dtype}; "
                                  f"scales are one of {', '.join(str(d).removeprefix('torch.') for d in SCALE_DTYPES)}")
        return dequantize(weight, scale, block)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise CheckpointError(f"{self._listing}: tensor {name!r} not found")
        return entry

    def _check_shape(self, name: str, expected: tuple[int, ...]) -> None:
        entry = self._entry(name)
        if entry.shape != expected:
            raise CheckpointError(
                f"{entry.file}: tensor {name!r} has shape {list(entry.shape)}, expected {list(expected)}"
            )

    def _read(self, entry: _Entry, name: str, read):
        """Run `read(handle)` on the tensor's shard, turning safetensors' errors into ones that name file and tensor."""
        try:
            return read(self._handle(entry.file))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{entry.file}: cannot read tensor {name!r}: {exc}") from exc

    def _handle(self, file: Path):
        with self._lock:
            if self._closed:
                raise ValueError(f"{self!r} is closed")
            handle = self._handles.get(file)
            if handle is None:
                handle = safe_open(str(file), framework="pt", device="cpu")
                self._handles[file] = handle
            return handle


def load_experts(
    reader: CheckpointReader,
    prefix: str,
    expert_ids: Sequence[int],
    hidden_size: int,
    intermediate_size: int,
    num_experts: int,
    dtype: torch.dtype,
    layout: str = "by_name",
) -> tuple[Tensor, Tensor]:
    """Weights of some routed experts of one MoE layer, reading only those experts.

    prefix: the MoE block's name, e.g. 'model.layers.3.block_sparse_moe' or 'model.layers.3.mlp'.
    expert_ids: logical expert ids, any order, repeats allowed. layout: `ModelConfig.expert_layout`.
    -> (w13 [n, 2I, H] = gate rows then up rows, w2 [n, H, I]) in expert_ids order, dtype `dtype`, contiguous.
    """
    ids = _expert_ids(expert_ids, num_experts)
    H, I = hidden_size, intermediate_size
    gate_up, down = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
    if layout == "gpt_oss":
        reader._check_shape(gate_up, (num_experts, H, 2 * I))
        reader._check_shape(down, (num_experts, I, H))
        w13 = _deinterleave(reader.get_rows(gate_up, ids, dtype)).transpose(1, 2)  # [n, 2I, H]
        return w13.contiguous(), reader.get_rows(down, ids, dtype).transpose(1, 2).contiguous()
    if layout == "gpt_oss_mxfp4":
        w13 = _read_mxfp4(reader, gate_up, ids, (num_experts, 2 * I, H), dtype)  # [n, 2I, H], rows interleaved
        return _deinterleave(w13, dim=1).contiguous(), _read_mxfp4(reader, down, ids, (num_experts, H, I), dtype)
    if layout != "by_name":
        raise ValueError(f"expert layout {layout!r} is not one of 'by_name', 'gpt_oss', 'gpt_oss_mxfp4'")
    scheme = _detect_scheme(reader, prefix)

    if scheme is None:  # fused: [E, 2I, H] and [E, H, I], read by rows
        gate_up, down = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
        reader._check_shape(gate_up, (num_experts, 2 * I, H))
        reader._check_shape(down, (num_experts, H, I))
        block = reader.fp8.block if reader.fp8 is not None and reader.has(f"{gate_up}_scale_inv") else None
        if block is not None and I % block[0]:  # (gate and up would share a block of scales at the seam)
            raise CheckpointError(f"{reader._entry(gate_up).file}: float8 {gate_up!r} with I={I} not a multiple of the "
                                  f"{block[0]}-row scale blocks: gate and up rows would share scales; not supported")
        return reader.get_rows(gate_up, ids, dtype), reader.get_rows(down, ids, dtype)

    gate, up, down = scheme
    w13 = torch.empty((len(ids), 2 * I, H), dtype=dtype)  # [n, 2I, H]
    w2 = torch.empty((len(ids), H, I), dtype=dtype)  # [n, H, I]
    for i, e in enumerate(ids):
        base = f"{prefix}.experts.{e}"
        w13[i, :I].copy_(reader.get(f"{base}.{gate}.weight", shape=(I, H)))
        w13[i, I:].copy_(reader.get(f"{base}.{up}.weight", shape=(I, H)))
        w2[i].copy_(reader.get(f"{base}.{down}.weight", shape=(H, I)))
    return w13, w2


def load_expert_biases(reader: CheckpointReader, prefix: str, expert_ids: Sequence[int], hidden_size: int,
                       intermediate_size: int, num_experts: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """GPT-OSS's expert biases (scheme 4), reading only those experts -> (b13 [n, 2I] gate then up, b2 [n, H])."""
    ids = _expert_ids(expert_ids, num_experts)
    gate_up, down = f"{prefix}.experts.gate_up_proj_bias", f"{prefix}.experts.down_proj_bias"
    reader._check_shape(gate_up, (num_experts, 2 * intermediate_size))
    reader._check_shape(down, (num_experts, hidden_size))
    return _deinterleave(reader.get_rows(gate_up, ids, dtype)).contiguous(), reader.get_rows(down, ids, dtype)


def _read_mxfp4(reader: CheckpointReader, name: str, ids: list[int], shape: tuple[int, int, int],
                dtype: torch.dtype) -> Tensor:
    """Rows `ids` of the MXFP4 weight `name` ([E, R, C] once unpacked, from `name_blocks` and `name_scales`)
    -> [n, R, C] in `dtype`. C must be a multiple of the 32-value blocks."""
    num, rows, cols = shape
    if cols % MXFP4_BLOCK:
        raise CheckpointError(f"{reader._listing}: MXFP4 {name!r} needs a multiple of {MXFP4_BLOCK} columns, got {cols}")
    reader._check_shape(f"{name}_blocks", (num, rows, cols // MXFP4_BLOCK, MXFP4_BLOCK // 2))
    reader._check_shape(f"{name}_scales", (num, rows, cols // MXFP4_BLOCK))
    return dequantize_mxfp4(reader.get_rows(f"{name}_blocks", ids), reader.get_rows(f"{name}_scales", ids)).to(dtype)


def _expert_ids(expert_ids: Sequence[int], num_experts: int) -> list[int]:
    ids = [operator.index(e) for e in expert_ids]
    for e in ids:
        if not 0 <= e < num_experts:
            raise ValueError(f"expert id {e} is out of range for num_experts={num_experts}")
    return ids


def _deinterleave(t: Tensor, dim: int = -1) -> Tensor:
    """2I entries along `dim`, gate and up alternating (GPT-OSS) -> gate entries, then up entries."""
    index = [slice(None)] * t.dim()
    gate, up = index.copy(), index
    gate[dim], up[dim] = slice(0, None, 2), slice(1, None, 2)
    return torch.cat((t[tuple(gate)], t[tuple(up)]), dim=dim)


# Per-expert schemes in detection order: (gate, up, down) projection names.
_PER_EXPERT_SCHEMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def _detect_scheme(reader: CheckpointReader, prefix: str) -> tuple[str, str, str] | None:
    """The per-expert projection names the checkpoint uses under `prefix`, or None for the fused pair.

    Probes expert 0, which every checkpoint has, so that a missing later expert is reported
    as that tensor missing rather than as an unknown layout.
    """
    looked_for = []
    for names in _PER_EXPERT_SCHEMES:
        probe = f"{prefix}.experts.0.{names[0]}.weight"
        if reader.has(probe):
            return names
        looked_for.append(probe)
    fused = f"{prefix}.experts.gate_up_proj"
    if reader.has(fused):
        return None
    looked_for.append(fused)
    raise CheckpointError(
        f"{reader._listing}: no routed experts under prefix {prefix!r}; looked for {', '.join(looked_for)}"
    )


def read_config(path: str | Path) -> dict:
    """The model's `config.json` as a dict; `path` is the checkpoint folder or the file itself."""
    file = Path(path)
    if file.is_dir():
        file = file / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file}: config file not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not a valid JSON config: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def _read_index(index: Path) -> dict[str, _Entry]:
    """Tensor name -> entry of a sharded checkpoint; checks that every shard exists and holds what the index says."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(exc).__name__}: {exc})") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")

    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    entries = {}
    for shard, names in by_shard.items():
        file = index.parent / shard
        if not file.is_file():
            raise CheckpointError(
                f"{index}: shard {file} does not exist (it should hold tensor {names[0]!r}"
                + (f" and {len(names) - 1} others)" if len(names) > 1 else ")")
            )
        shapes = _read_header(file)
        for name in names:
            if name not in shapes:
                raise CheckpointError(f"{file}: tensor {name!r} not found (the index {index.name} places it here)")
            entries[name] = _Entry(file, shapes[name])
    return entries


def _read_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, reading only the header.

    Layout: 8-byte little-endian header length N, N bytes of JSON
    `{name: {"dtype", "shape", "data_offsets": [begin, end]}}`, then the data, with
    offsets relative to its start. A tensor that ends past the end of the file is reported
    by name, so a shard cut short by an interrupted copy says which weights it lost.
    """
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file}: not a safetensors file ({size} bytes, no 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{file}: not a safetensors file or truncated "
                    f"(header length {header_len} does not fit in {size} bytes)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read: {exc}") from exc
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise TypeError("header is not a JSON object")
        header.pop("__metadata__", None)
        spans = {  # name -> (shape, begin, end)
            name: (tuple(int(d) for d in info["shape"]), *map(int, info["data_offsets"]))
            for name, info in header.items()
        }
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a safetensors file (bad header: {type(exc).__name__}: {exc})") from exc

    data_len = size - 8 - header_len
    cut = sorted((begin, name) for name, (_, begin, end) in spans.items() if end > data_len)
    if cut:
        others = f" and {len(cut) - 1} more tensors" if len(cut) > 1 else ""
        raise CheckpointError(
            f"{file}: truncated: data of tensor {cut[0][1]!r}{others} extends past the end of the file ({size} bytes)"
        )
    return {name: shape for name, (shape, _, _) in spans.items()}


def _runs(sorted_rows: list[int]) -> list[tuple[int, int]]:
    """[1, 2, 3, 7, 8] -> [(1, 4), (7, 9)]: half-open ranges of consecutive rows."""
    runs: list[tuple[int, int]] = []
    for row in sorted_rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs
