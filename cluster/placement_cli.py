"""`moeray policy ...`, `moeray placement ...`, `moeray load ...`: the autoscaler from the command line.

Offline (no server): `policy schema`, `policy validate`, `placement init`, `placement plan`,
`placement simulate`. Against a running server, through its admin API (`--url`, `--token`):
`policy apply`, `policy show`, `placement show`, `placement migrate`, `load dump`.
Problems exit with code 2 and say what to fix; `policy validate` prints every problem as
`FILE:LINE: field.path: message`.
"""

import json
import sys
import time
from pathlib import Path

from moeray.cluster import observe_cli
from moeray.cluster.admin_client import server_flags


def register(sub, parser_class, positive_int, non_negative_int) -> None:
    """Add the commands to `moeray`'s subparsers (the parser class and int types are cli.py's)."""
    policy = sub.add_parser("policy", help="check, apply and inspect placement policies")
    psub = policy.add_subparsers(dest="action", required=True, parser_class=parser_class)
    schema = psub.add_parser("schema", help="print the policy's JSON Schema (for editor completion)")
    schema.set_defaults(func=run_policy_schema)
    validate = psub.add_parser("validate", help="check policy files; every problem as FILE:LINE: field.path: message")
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    validate.add_argument("--plan", type=Path, default=None,
                          help="also check that pins and layer ids fit this plan (JSON, e.g. from placement show --json)")
    validate.set_defaults(func=run_policy_validate)
    apply = psub.add_parser("apply", help="apply a policy file to a running server (a bad one is rejected)")
    apply.add_argument("file", type=Path, metavar="FILE")
    server_flags(apply)
    apply.set_defaults(func=run_policy_apply)
    show = psub.add_parser("show", help="the policy in force on a running server")
    server_flags(show)
    show.set_defaults(func=run_policy_show)

    placement = sub.add_parser("placement", help="placement plans: make, plan offline, simulate, show, migrate")
    lsub = placement.add_subparsers(dest="action", required=True, parser_class=parser_class)
    init = lsub.add_parser("init", help="write a starting plan (contiguous experts per group, replicas in spare slots)")
    init.add_argument("--layers", type=positive_int, required=True, help="MoE layers (L)")
    init.add_argument("--experts", type=positive_int, required=True, help="logical experts per layer (E)")
    init.add_argument("--groups", type=positive_int, required=True, help="expert groups (G)")
    init.add_argument("--slots-per-group", type=positive_int, required=True, help="slots per group and layer (S)")
    init.add_argument("--out", type=Path, default=None, help="write here (default: print)")
    init.set_defaults(func=run_placement_init)
    plan = lsub.add_parser("plan", help="what the planner would do: load + current plan + policy -> new plan, moves")
    plan.add_argument("--load", type=Path, required=True, help='{"load": [[...E] ...L]} JSON or an .npy of shape [L, E]')
    plan.add_argument("--current", type=Path, required=True, help="the current plan (JSON)")
    plan.add_argument("--policy", type=Path, default=None, help="policy YAML (default: the built-in default policy)")
    plan.add_argument("--bytes-per-expert", type=positive_int, default=1, help="weight bytes of one expert (default 1)")
    plan.add_argument("--group-nodes", default=None, help="node of each group, e.g. 0,0,1,1 (default: one node each)")
    plan.add_argument("--json", action="store_true", help="print one JSON object (default: a summary)")
    plan.set_defaults(func=run_placement_plan)
    simulate = lsub.add_parser("simulate", help="replay a recorded load trace through the planner round by round")
    simulate.add_argument("--trace", type=Path, required=True,
                          help="`moeray load dump` output (JSON lines), {\"windows\": [...]} JSON or .npy [R, L, E]")
    simulate.add_argument("--policy", type=Path, default=None, help="policy YAML (default: the built-in default policy)")
    simulate.add_argument("--current", type=Path, default=None, help="starting plan (default: placement init with --groups)")
    simulate.add_argument("--groups", type=positive_int, default=None, help="expert groups, without --current")
    simulate.add_argument("--slots-per-group", type=positive_int, default=None,
                          help="slots per group, without --current (default: fits E/G plus the policy's redundant slots)")
    simulate.add_argument("--bytes-per-expert", type=positive_int, default=1, help="weight bytes of one expert")
    simulate.add_argument("--json", action="store_true", help="print per-round records as JSON")
    simulate.set_defaults(func=run_placement_simulate)
    show = lsub.add_parser("show", help="the live plan of a running server")
    server_flags(show)
    show.add_argument("--json", action="store_true", help="print the plan JSON (usable as --current)")
    show.set_defaults(func=run_placement_show)
    migrate = lsub.add_parser("migrate", help="replicate (--to-group), move (both) or drop (--from-group) one expert copy "
                                              "on a running server")
    migrate.add_argument("--layer", type=non_negative_int, required=True, help="MoE layer index")
    migrate.add_argument("--expert", type=non_negative_int, required=True, help="logical expert id")
    migrate.add_argument("--to-group", type=non_negative_int, default=None, help="group that gets a copy")
    migrate.add_argument("--from-group", type=non_negative_int, default=None, help="group whose copy moves or is dropped")
    server_flags(migrate)
    migrate.set_defaults(func=run_placement_migrate)

    scale = sub.add_parser("scale", help="resize the expert pool of a running server (serving goes on)")
    scale.add_argument("--expert-groups", type=positive_int, required=True, help="groups to have")
    scale.add_argument("--wait", action="store_true", help="wait until the resize is done (exit 1 if it fails)")
    scale.add_argument("--timeout-s", type=float, default=600.0, help="with --wait: give up after this (default 600)")
    server_flags(scale)
    scale.set_defaults(func=run_scale)

    load = sub.add_parser("load", help="expert load of a running server")
    dsub = load.add_subparsers(dest="action", required=True, parser_class=parser_class)
    dump = dsub.add_parser("dump", help="append load snapshots (JSON lines) to a file, for placement simulate and plots")
    dump.add_argument("--out", type=Path, required=True, help="file to append to")
    dump.add_argument("--window-s", type=float, default=None, help="seconds each snapshot sums (default: all kept, 300)")
    dump.add_argument("--count", type=positive_int, default=1, help="snapshots to take (default 1)")
    dump.add_argument("--interval-s", type=float, default=10.0, help="seconds between snapshots (default 10)")
    server_flags(dump)
    dump.set_defaults(func=run_load_dump)
    observe_cli.register_load_plot(dsub)  # `load plot`


def _client(args):
    from moeray.cluster.admin_client import AdminClient

    return AdminClient(args.url, args.token)


def run_policy_schema(args) -> int:
    from moeray.autoscaler.policy import Policy

    print(json.dumps(Policy.model_json_schema(), indent=2))
    return 0


def run_policy_validate(args) -> int:
    from moeray.autoscaler.policy import PolicyError, check_fits, load_policy

    plan = _read_plan(args.plan) if args.plan else None
    failed = False
    for path in args.files:
        try:
            policy = load_policy(path)
            if plan is not None:
                check_fits(policy, plan.num_layers, plan.num_experts, plan.num_groups,
                           plan.physical_to_logical.tolist(), path.read_text(), str(path))
            print(f"{path}: ok")
        except PolicyError as err:
            print(err, file=sys.stderr)
            failed = True
    return 1 if failed else 0


def run_policy_apply(args) -> int:
    if not args.file.is_file():
        raise ValueError(f"{args.file}: no such file")
    from moeray.autoscaler.policy import load_policy

    load_policy(args.file)  # every schema problem, located, before anything is sent
    result = _client(args).put_text("/admin/policy", args.file.read_text(), {"X-Policy-Source": str(args.file)})
    print(f"{args.file}: applied (reloads: {result['reloads']['success']} applied, {result['reloads']['rejected']} rejected)")
    return 0


def run_policy_show(args) -> int:
    result = _client(args).get("/admin/policy")
    print(f"# source: {result['source']}")
    print(json.dumps(result["policy"], indent=2))
    return 0


def run_placement_init(args) -> int:
    from moeray.actors.placement import PlacementPlan

    base = -(-args.experts // args.groups)
    if args.slots_per_group < base:
        raise ValueError(f"--slots-per-group {args.slots_per_group} is too few: {args.experts} experts over "
                         f"{args.groups} groups need at least {base} slots per group")
    plan = PlacementPlan.default(args.layers, args.experts, args.groups, args.slots_per_group - base)
    _write_or_print(plan.to_json(), args.out)
    return 0


def run_placement_plan(args) -> int:
    from moeray.autoscaler import planner
    from moeray.autoscaler.policy import Policy, limits, load_policy, topology

    current = _read_plan(args.current)
    load = read_load(args.load)
    if tuple(load.shape) != (current.num_layers, current.num_experts):
        raise ValueError(f"--load has shape {list(load.shape)}, the plan needs [{current.num_layers}, {current.num_experts}]")
    policy = load_policy(args.policy) if args.policy else Policy()
    nodes = _group_nodes(args.group_nodes, current.num_groups)
    new, moves = planner.plan(load, current, topology(policy, nodes), limits(policy, current.num_layers, args.bytes_per_expert))
    before, after = current.imbalance(load), new.imbalance(load)
    result = {"plan": json.loads(new.to_json()), "moves": [_move(m) for m in moves],
              "imbalance_before": float(before.mean()), "imbalance_after": float(after.mean()),
              "imbalance_before_per_layer": before.tolist(), "imbalance_after_per_layer": after.tolist(),
              "bytes": sum(m.new_expert >= 0 for m in moves) * args.bytes_per_expert}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(moves)} move(s), {result['bytes']} bytes; mean imbalance over layers "
              f"{result['imbalance_before']:.3f} -> {result['imbalance_after']:.3f}, worst layer "
              f"{float(before.max()):.3f} -> {float(after.max()):.3f}")
        for m in moves:
            print(f"  layer {m.layer} group {m.group} slot {m.slot}: {m.kind} {m.old_expert} -> {m.new_expert}")
    return 0


def run_placement_simulate(args) -> int:
    from moeray.actors.placement import PlacementPlan
    from moeray.autoscaler.policy import Policy, limits, load_policy, topology
    from moeray.autoscaler.simulate import simulate

    trace = read_trace(args.trace)  # [R, L, E]
    policy = load_policy(args.policy) if args.policy else Policy()
    num_layers, num_experts = trace.shape[1], trace.shape[2]
    if args.current is not None:
        plan = _read_plan(args.current)
    else:
        if args.groups is None:
            raise ValueError("give --current PLAN.json, or --groups G (and optionally --slots-per-group)")
        base = -(-num_experts // args.groups)
        slots = args.slots_per_group or base + policy.replication.redundant_slots_per_group
        if slots < base:
            raise ValueError(f"--slots-per-group {slots} is too few for {num_experts} experts over {args.groups} groups")
        plan = PlacementPlan.default(num_layers, num_experts, args.groups, slots - base)
    if (plan.num_layers, plan.num_experts) != (num_layers, num_experts):
        raise ValueError(f"the trace is [L={num_layers}, E={num_experts}], the plan [L={plan.num_layers}, E={plan.num_experts}]")
    records = simulate(trace, plan, topology(policy, list(range(plan.num_groups))),
                       limits(policy, num_layers, args.bytes_per_expert))
    rounds = [{"round": r.round, "imbalance_before": r.imbalance_before, "imbalance_after": r.imbalance_after,
               "loads": r.num_loads, "bytes": r.num_bytes, "version": r.version} for r in records]
    summary = {"rounds": len(rounds),
               "mean_imbalance_without": sum(r["imbalance_before"] for r in rounds) / len(rounds),
               "mean_imbalance_with": sum(r["imbalance_after"] for r in rounds) / len(rounds),
               "experts_moved": sum(r["loads"] for r in rounds), "bytes_moved": sum(r["bytes"] for r in rounds)}
    if args.json:
        print(json.dumps({"rounds": rounds, "summary": summary}))
        return 0
    print("round  imbalance (next window): as placed -> replanned  loads  bytes")
    for r in rounds:
        print(f"{r['round']:>5}  {r['imbalance_before']:>27.3f} -> {r['imbalance_after']:.3f}  {r['loads']:>5}  {r['bytes']}")
    print(f"{summary['rounds']} rounds: mean imbalance {summary['mean_imbalance_without']:.3f} -> "
          f"{summary['mean_imbalance_with']:.3f}; {summary['experts_moved']} experts, {summary['bytes_moved']} bytes moved")
    return 0


def run_placement_show(args) -> int:
    result = _client(args).get("/admin/placement")
    if args.json:
        print(json.dumps(result["plan"]))
        return 0
    plan = result["plan"]
    print(f"plan v{plan['version']}: {plan['num_groups']} groups x {plan['slots_per_group']} slots, "
          f"{len(plan['physical_to_logical'])} MoE layers (-1 = empty slot)")
    for layer, groups in enumerate(plan["physical_to_logical"]):
        print(f"  layer {layer:>3}: " + " | ".join(" ".join(f"{e:>3}" for e in slots) for slots in groups))
    return 0


def run_placement_migrate(args) -> int:
    result = _client(args).post_json("/admin/migrate", {"layer": args.layer, "expert": args.expert,
                                                         "to_group": args.to_group, "from_group": args.from_group})
    print(f"staging plan v{result['new_version']}: {result['reason']}")
    return 0


def run_scale(args) -> int:
    client = _client(args)
    queued = client.post_json("/admin/scale", {"expert_groups": args.expert_groups})
    print(f"resize to {queued['target']} expert groups queued ({queued['reason']})", file=sys.stderr)
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout_s
    while time.monotonic() < deadline:
        last = client.get("/admin/autoscaler?limit=1")["status"]["scaling"]
        if last and last["target"] == args.expert_groups and last["result"] in ("done", "failed"):
            if last["result"] == "failed":
                raise RuntimeError(f"resize to {args.expert_groups} expert groups failed: {last['error']}")
            print(f"the pool has {args.expert_groups} expert groups (resized in {last['seconds']:.1f} s)")
            return 0
        time.sleep(0.5)
    raise RuntimeError(f"the resize to {args.expert_groups} expert groups was not done within {args.timeout_s:.0f} s")


def run_load_dump(args) -> int:
    client = _client(args)
    query = f"?window_s={args.window_s}" if args.window_s else ""
    with args.out.open("a") as out:
        for i in range(args.count):
            if i:
                time.sleep(args.interval_s)
            snapshot = client.get("/admin/load" + query)
            snapshot["time"] = time.time()
            out.write(json.dumps(snapshot) + "\n")
            out.flush()
            print(f"{args.out}: snapshot {i + 1}/{args.count} (plan v{snapshot['plan_version']}, "
                  f"{snapshot['window_steps']} steps)", file=sys.stderr)
    return 0


def read_load(path: Path):
    """[L, E] float64 from {"load": [[...]]} JSON, a `load dump` line, or an .npy."""
    import torch

    data = _read_array_file(path, key="load")
    load = torch.as_tensor(data, dtype=torch.float64)
    if load.dim() != 2:
        raise ValueError(f"{path}: load must be [layers, experts], got shape {list(load.shape)}")
    if (load < 0).any() or not torch.isfinite(load).all():
        raise ValueError(f"{path}: load must be finite token counts >= 0")
    return load


def read_trace(path: Path):
    """[R, L, E] float64 from `load dump` JSON lines (their windows), {"windows": [...]} JSON, or an .npy."""
    import torch

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix == ".npy":
        trace = torch.as_tensor(_read_array_file(path, key=None), dtype=torch.float64)
    else:
        text = path.read_text()
        try:
            whole = json.loads(text)
            windows = whole["windows"] if isinstance(whole, dict) and "windows" in whole else None
            if windows is None:
                raise ValueError
        except ValueError:
            try:
                windows = [json.loads(line)["window"] for line in text.splitlines() if line.strip()]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: expected `moeray load dump` JSON lines or {{\"windows\": [...]}}: {err}") from None
        trace = torch.as_tensor(windows, dtype=torch.float64)
    if trace.dim() != 3 or trace.shape[0] < 2:
        raise ValueError(f"{path}: a trace is at least 2 windows of [layers, experts], got shape {list(trace.shape)}")
    return trace


def _read_array_file(path: Path, key: str | None):
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix == ".npy":
        import numpy as np

        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path}: not a readable .npy: {err}") from None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if isinstance(data, dict) and key in data:
        return data[key]
    if isinstance(data, dict) and "window" in data:  # one `moeray load dump` snapshot
        return data["window"]
    raise ValueError(f"{path}: expected {{\"{key}\": [[...]]}}")


def _read_plan(path: Path):
    from moeray.actors.placement import PlacementPlan

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    return PlacementPlan.from_json(path.read_text())


def _group_nodes(text: str | None, num_groups: int) -> list[int]:
    if text is None:
        return list(range(num_groups))
    try:
        nodes = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--group-nodes {text!r} must be comma-separated integers") from None
    if len(nodes) != num_groups:
        raise ValueError(f"--group-nodes names {len(nodes)} groups, the plan has {num_groups}")
    return nodes


def _move(move) -> dict:
    return {k: getattr(move, k) for k in ("layer", "group", "slot", "old_expert", "new_expert", "kind")}


def _write_or_print(text: str, out: Path | None) -> None:
    if out is None:
        print(text)
    else:
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
