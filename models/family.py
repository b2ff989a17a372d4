"""The family registry: which Hugging Face architectures moeray serves and how each is read.

A `Family` turns config.json into a `ModelConfig` and says where each weight lives in the
checkpoint. Families that share Llama-style names override only what differs, so adding one
is a new module that registers itself, touching no other (DeepSeek-V2 and V3, with MLA, are two).
Attention modules name their own weights (`weight_names(prefix)`), so a family with another
attention needs no loader change either.
"""

from abc import ABC, abstractmethod

from moeray.models.config import ConfigError, ModelConfig


class Family(ABC):
    """Base for a model family; subclasses set `name`, `architectures`, `defaults` and implement `read`."""

    name: str = ""
    architectures: tuple[str, ...] = ()
    # What transformers' config class assumes for optional fields a config.json leaves out. They
    # differ by family: Mixtral's rms_norm_eps is 1e-5 and its rope_theta 1e6, Qwen's 1e-6 and the
    # 1e4 that RopeConfig assumes when no family says otherwise.
    defaults: dict = {}

    def parse(self, raw: dict) -> ModelConfig:
        """config.json (as a dict) -> ModelConfig, absent optional fields as transformers reads them;
        raises ConfigError naming the field and value."""
        return self.read({**self.defaults, **raw})

    @abstractmethod
    def read(self, raw: dict) -> ModelConfig:
        """`parse` of a config with the family's defaults filled in."""

    # Weight names (Llama-style defaults). `layer` is the decoder layer index.
    gate_name = "gate"  # the MoE block's router linear, under its prefix (GPT-OSS: "router")

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}"

    def moe_prefixes(self, layer: int) -> list[str]:
        """Candidate names of layer `layer`'s MoE block; the first whose gate exists is used."""
        return [f"{self.layer_prefix(layer)}.mlp"]

    def dense_mlp_prefix(self, layer: int) -> str:
        return f"{self.layer_prefix(layer)}.mlp"

    def shared_expert_prefix(self, moe_prefix: str) -> str:
        """The shared expert(s) under an MoE block (Qwen2-MoE's name; DeepSeek says shared_experts)."""
        return f"{moe_prefix}.shared_expert"


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    for arch in family.architectures:
        _FAMILIES[arch] = family
    return family


def family_for(raw: dict) -> Family:
    """The family of a parsed config.json, chosen by `architectures[0]`; a clear error otherwise."""
    import moeray.models.families  # noqa: F401  (registers the built-in families)

    archs = raw.get("architectures") or []
    if not archs:
        raise ConfigError(f"config.json: 'architectures' is missing or empty; supported: {supported()}")
    if archs[0] not in _FAMILIES:
        raise ConfigError(f"config.json: architecture {archs[0]!r} is not supported; supported: {supported()}")
    return _FAMILIES[archs[0]]


def supported() -> list[str]:
    return sorted(_FAMILIES)
