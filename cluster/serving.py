"""`ServingSpec`: what `moeray serve` runs, from a YAML file (`--config`) and/or flags.

One schema for both: flags override the file's values, and a YAML key the schema does not
know is an error (`extra="forbid"`), reported as `FILE:LINE: field: message`.
"""

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ServingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="checkpoint folder (Hugging Face format); default: the built-in model")
    served_model_name: str | None = Field(
        None, description="name clients use (/v1/models, Triton model name); default: the checkpoint folder's name")
    expert_groups: int = Field(2, ge=1, description="expert-group actors (one GPU each when the cluster has GPUs)")
    redundant_slots: int | None = Field(
        None, ge=0, description="extra expert slots per group and layer, for replicas; default: the policy's "
                                "replication.redundant_slots_per_group")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="weights and activations")
    group_resources: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Ray resources each expert group asks for instead of the automatic choice "
        "(one GPU, or its weights' memory), e.g. {moeray_expert_group: 1} on a cluster from cluster/launch/*.yaml, "
        "whose autoscaler adds worker nodes carrying that resource")
    address: str | None = Field(None, description="Ray cluster to join ('auto' or HOST:PORT); default: start a local one")
    host: str = Field("127.0.0.1", description="interface the HTTP and gRPC servers bind; 0.0.0.0 to expose them")
    http_port: int = Field(8000, ge=1, le=65535, description="OpenAI-compatible HTTP API")
    grpc_port: int = Field(8001, ge=1, le=65535, description="KServe v2 / Triton gRPC API")
    metrics_port: int = Field(8002, ge=1, le=65535, description="Prometheus /metrics")
    metrics_experts_per_layer: int | None = Field(
        None, ge=1, description="per-expert metric series: each layer's N busiest experts plus 'other' "
                                "(default: every expert; set it for models with hundreds of experts)")
    policy: str | None = Field(
        None, description="placement policy YAML (configs/policies/*.yaml); default: the built-in default policy, "
                          "the same as configs/policies/default.yaml")
    autoscaler: bool = Field(True, description="run the placement autoscaler (false: the placement stays as deployed)")
    watch_policy: bool = Field(True, description="re-apply the policy file when it changes on disk")
    admin_token: str | None = Field(
        None, description="bearer token of the admin API (/admin/*); default: $MOERAY_ADMIN_TOKEN, else a random "
                          "one written to ~/.moeray/admin-token")
    max_request_bytes: int = Field(
        4 << 20, ge=1024, description="largest request: an HTTP body (413 beyond) or a gRPC inference message "
                                      "(RESOURCE_EXHAUSTED beyond)")
    saturation_score: float = Field(
        1.5, gt=1.0, description="flag a client for expert saturation when its traffic concentrates on its busiest "
                                 "experts this many times more than everyone else's does on theirs (about 1 = like "
                                 "everyone; the most a client can reach is 1 / the others' top-k share, e.g. ~1.8 on "
                                 "the built-in model, ~10 on a 256-expert one)")
    saturation_min_pairs: int = Field(1024, ge=1, description="... once it has routed at least this many (token, expert) pairs")
    client_token_rate_limit: float | None = Field(
        None, gt=0, description="tokens per second one client may ask for (prompt + max_tokens, 10 s of burst); "
                                "beyond it 429 / RESOURCE_EXHAUSTED. Clients are named by the x-moeray-client header "
                                "or their API key. Default: no limit")
    max_queued_requests: int = Field(256, ge=1, description="waiting requests beyond which new ones get 429 / RESOURCE_EXHAUSTED")
    max_num_seqs: int = Field(64, ge=1, description="sequences decoded together in one step")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens per step; longer prompts are prefilled in chunks")
    kv_cache_bytes: int = Field(256 << 20, ge=1, description="KV cache budget of the router, in bytes")
    max_model_len: int | None = Field(None, ge=2, description="longest sequence (prompt + output); default: the model's")


class SpecError(ValueError):
    """A serving YAML that does not validate; one `FILE:LINE: field: message` line per problem."""


def load_spec(path: str | Path, overrides: dict | None = None) -> ServingSpec:
    """The spec in `path` with `overrides` (flags the user gave) on top."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such file")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}:1: the file must be a mapping of serving settings")
    try:
        return ServingSpec(**{**data, **(overrides or {})})
    except ValidationError as err:
        raise SpecError("\n".join(_located(path, text, e) for e in err.errors())) from None


def _located(path: Path, text: str, error: dict) -> str:
    field = ".".join(str(p) for p in error["loc"])
    line = next((i + 1 for i, row in enumerate(text.splitlines()) if row.split(":")[0].strip() == str(error["loc"][0])), 1)
    return f"{path}:{line}: {field}: {error['msg']}"
