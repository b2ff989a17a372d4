"""`moeray` command line. Bad arguments exit with code 2 and a one-line message."""

import argparse
import json
import sys
from pathlib import Path

from moeray.cluster import launch_cli, observe_cli, placement_cli

DTYPES = ("bfloat16", "float32")  # torch dtype names; torch is imported only once arguments are good


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _prompt_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r} must be comma-separated integers") from None


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 1")
    return int(text)


def _group_resource(text: str) -> tuple[str, float]:
    name, _, amount = text.partition("=")
    try:
        value = float(amount)
    except ValueError:
        value = 0.0
    if not name.strip() or not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be NAME=AMOUNT with AMOUNT > 0, e.g. moeray_expert_group=1")
    return name.strip(), value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moeray", description="Serve Mixture-of-Experts LLMs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="generate text from a prompt, in-process",
                         description="Generate text from a prompt. Streams to the terminal; --json prints one object.")
    gen.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the built-in model)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", type=_prompt_ids, help="prompt as token ids, e.g. 1,2,3")
    gen.add_argument("--max-tokens", type=_positive_int, default=64, help="tokens to generate at most (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations")
    gen.add_argument("--json", action="store_true", help='print one JSON object: {"token_ids", "text", ...}')
    cluster = gen.add_argument_group("cluster engine (--engine cluster)")
    gen.add_argument("--engine", choices=("local", "cluster"), default="local",
                     help="local: in-process (default); cluster: router + expert groups as Ray actors")
    cluster.add_argument("--expert-groups", type=_positive_int, default=2, help="expert groups (default 2)")
    cluster.add_argument("--redundant-slots", type=_non_negative_int, default=0,
                         help="extra slots per group per layer, filled with replicas (default 0)")
    cluster.add_argument("--address", default=None,
                         help="Ray cluster to join: 'auto' or HOST:PORT (default: start a local one)")
    cluster.add_argument("--plan", type=Path, default=None, help="initial placement plan (JSON file)")
    gen.set_defaults(func=run_generate)

    srv = sub.add_parser("serve", help="serve a model over OpenAI HTTP and KServe v2 gRPC",
                         description="Serve a model: local Ray (or --address), a router and expert groups, "
                                     "OpenAI-compatible HTTP and KServe v2 / Triton gRPC. Ctrl-C stops it. "
                                     "Flags override --config values.")
    srv.add_argument("--config", type=Path, default=None, help="ServingSpec YAML (see configs/serving/default.yaml)")
    srv.add_argument("--model", default=None, help="checkpoint folder (default: the built-in model)")
    srv.add_argument("--served-model-name", default=None, help="model name clients use (default: the folder's name)")
    srv.add_argument("--expert-groups", type=_positive_int, default=None, help="expert groups (default 2)")
    srv.add_argument("--redundant-slots", type=_non_negative_int, default=None, help="replica slots per group (default 0)")
    srv.add_argument("--dtype", choices=DTYPES, default=None, help="weights and activations (default float32)")
    srv.add_argument("--address", default=None, help="Ray cluster to join: 'auto' or HOST:PORT (default: a local one)")
    srv.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1)")
    srv.add_argument("--http-port", type=_positive_int, default=None, help="OpenAI HTTP port (default 8000)")
    srv.add_argument("--grpc-port", type=_positive_int, default=None, help="KServe v2 gRPC port (default 8001)")
    srv.add_argument("--metrics-port", type=_positive_int, default=None, help="Prometheus /metrics port (default 8002)")
    srv.add_argument("--max-queued-requests", type=_positive_int, default=None,
                     help="waiting requests beyond which new ones get 429 / RESOURCE_EXHAUSTED (default 256)")
    srv.add_argument("--policy", default=None,
                     help="placement policy YAML, re-applied when it changes (default: the built-in default policy)")
    srv.add_argument("--no-autoscaler", dest="autoscaler", action="store_const", const=False, default=None,
                     help="keep the placement as deployed")
    srv.add_argument("--group-resource", type=_group_resource, action="append", default=None, metavar="NAME=AMOUNT",
                     help="a Ray resource each expert group asks for instead of the automatic choice (repeatable), "
                          "e.g. moeray_expert_group=1 on a cluster from cluster/launch/*.yaml")
    srv.set_defaults(func=run_serve)
    placement_cli.register(sub, _Parser, _positive_int, _non_negative_int)
    launch_cli.register(sub)
    observe_cli.register(sub)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from moeray.actors.sequence import SamplingParams
    from moeray.models import DEFAULT_MODEL_DIR
    from moeray.models.tokenizer import Tokenizer

    path = args.model or DEFAULT_MODEL_DIR
    if not path.is_dir():
        raise ValueError(f"--model {str(path)!r}: no such checkpoint folder")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() or args.prompt is not None else None
    prompt_ids = args.prompt_ids if args.prompt_ids is not None else tokenizer.encode(args.prompt)
    if args.engine == "cluster":
        stream = _cluster_stream(args, path, prompt_ids, params)
    else:
        stream = _local_stream(args, path, tokenizer, prompt_ids, params)
    if not args.json and args.prompt is not None:
        print(args.prompt, end="", flush=True)
    token_ids, text, reason = [], "", None
    for new_ids, new_text, reason in stream:
        token_ids += new_ids
        text += new_text
        if not args.json:
            print(new_text, end="", flush=True)
    if args.json:
        print(json.dumps({"token_ids": token_ids, "text": text, "prompt_ids": prompt_ids, "finish_reason": reason}))
    else:
        print()
    return 0


def _local_stream(args, path, tokenizer, prompt_ids, params):
    """In-process engine: yields (new token ids, new text, finish reason) per step."""
    import torch

    from moeray.actors.engine import Engine
    from moeray.models import load_model

    model = load_model(path, getattr(torch, args.dtype), progress=None if args.json else _progress)
    engine = Engine(model, tokenizer)
    seq_id = engine.add_request(prompt_ids, params)
    while engine.has_unfinished:
        for out in engine.step():
            if out.seq_id == seq_id:
                yield out.new_token_ids, out.new_text, out.finish_reason


def _cluster_stream(args, path, prompt_ids, params):
    """Router + expert groups on Ray (a local cluster unless --address): same output as local."""
    import ray

    from moeray.actors.placement import PlacementPlan
    from moeray.cluster.deploy import ClusterConfig, deploy

    plan = None
    if args.plan is not None:
        if not args.plan.is_file():
            raise ValueError(f"--plan {str(args.plan)!r}: no such file")
        plan = PlacementPlan.from_json(args.plan.read_text())
    ray.init(address=args.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    deployment = None
    try:
        deployment = deploy(ClusterConfig(str(path), num_groups=args.expert_groups, redundant_slots=args.redundant_slots,
                                          dtype=args.dtype, plan=plan))
        for item in deployment.generate(prompt_ids, params):
            yield item["token_ids"], item["text"], item["finish_reason"]
    finally:
        if deployment is not None:
            deployment.shutdown()
        ray.shutdown()


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from moeray.cluster.server import start
    from moeray.cluster.serving import ServingSpec, load_spec

    keys = ("model", "served_model_name", "expert_groups", "redundant_slots", "dtype", "address", "host",
            "http_port", "grpc_port", "metrics_port", "max_queued_requests", "policy", "autoscaler")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.group_resource:
        overrides["group_resources"] = dict(args.group_resource)
    try:
        spec = load_spec(args.config, overrides) if args.config else ServingSpec(**overrides)
    except ValidationError as err:
        raise ValueError("; ".join(f"--{'-'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())) from None
    server = start(spec)
    try:
        print(f"moeray is serving {server.model_name!r}: OpenAI HTTP {server.http_url}/v1, "
              f"KServe v2 gRPC {server.grpc_target}, Prometheus {server.metrics_url} (Ctrl-C stops it)", flush=True)
        autoscaler = f"on, policy {spec.policy or 'built-in default'}" if server.controller is not None else "off"
        print(f"placement autoscaler {autoscaler}; admin API {server.http_url}/admin (token {server.token_source})",
              flush=True)
        server.wait()
    finally:
        print("moeray: shutting down", file=sys.stderr, flush=True)
        server.stop()
    return 0


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\rloading weights: layer {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad checkpoint, config, plan or request values: the user's to fix
        print(f"moeray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # e.g. DeploymentError: the cluster could not place or start something
        print(f"moeray {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
