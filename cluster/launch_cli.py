"""`moeray cluster ...`: the cluster-launch files' commands (argparse wiring; the logic is elsewhere).

    moeray cluster render --tf-output tf.json --template cluster/launch/aws-gpu.yaml --out cluster.yaml
    moeray cluster check cluster/launch/*.yaml            # Ray's schema + moeray's checks, offline
    moeray cluster check --rendered cluster.yaml          # ... and ready for `ray up` on AWS

`cli.build_parser` calls `register`; errors are ValueErrors, which `cli.main` turns into exit 2.
"""

import argparse
import sys
from pathlib import Path

import yaml


def register(sub) -> None:
    """Add `cluster render` and `cluster check` to the `moeray` subcommands `sub`."""
    cluster = sub.add_parser("cluster", help="render and check `ray up` cluster files",
                             description="Cluster launch files: render a `ray up` file from terraform's outputs, "
                                         "check cluster files offline.")
    actions = cluster.add_subparsers(dest="cluster_command", required=True, parser_class=type(cluster))
    render = actions.add_parser("render", help="terraform outputs + a template -> a ready `ray up` file",
                                description="Fill a `ray up` template with the subnet, security group, instance "
                                            "profiles, placement group, image and region from `terraform output "
                                            "-json`, check the result, and write it.")
    render.add_argument("--tf-output", type=Path, required=True,
                        help="what `terraform output -json` printed: a file, or - for standard input")
    render.add_argument("--template", type=Path, required=True, help="e.g. cluster/launch/aws-gpu.yaml")
    render.add_argument("--out", type=Path, required=True, help="where to write the cluster file (e.g. cluster.yaml)")
    render.set_defaults(func=run_render)
    check = actions.add_parser("check", help="check cluster files offline (Ray's schema + moeray's checks)")
    check.add_argument("files", type=Path, nargs="+", help="cluster YAML files")
    check.add_argument("--rendered", action="store_true",
                       help="also require what `ray up` on AWS needs from terraform (subnet, profiles, ...)")
    check.set_defaults(func=run_check)


def run_render(args: argparse.Namespace) -> int:
    from moeray.cluster.launch_config import ClusterConfigError, check_cluster_config, load_cluster_file
    from moeray.cluster.render import read_tf_outputs, render_cluster

    if str(args.tf_output) == "-":
        text = sys.stdin.read()
    elif args.tf_output.is_file():
        text = args.tf_output.read_text()
    else:
        raise ValueError(f"--tf-output {str(args.tf_output)!r}: no such file (save `terraform output -json` there)")
    outputs = read_tf_outputs(text, str(args.tf_output))
    config = render_cluster(load_cluster_file(args.template), outputs)
    problems = check_cluster_config(config, rendered=True)
    if problems:
        raise ClusterConfigError("\n".join(f"{args.out} (rendered from {args.template}): {p}" for p in problems))
    header = (f"# Written by `moeray cluster render` from {args.template} and {args.tf_output}.\n"
              "# Edit those and render again rather than editing this file.\n")
    args.out.write_text(header + yaml.safe_dump(config, sort_keys=False, width=120))
    print(f"wrote {args.out}; bring the cluster up with: ray up {args.out}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from moeray.cluster.launch_config import ClusterConfigError, load_cluster_file

    problems = []
    for path in args.files:
        try:
            load_cluster_file(path, rendered=args.rendered)
            print(f"{path}: ok")
        except ClusterConfigError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("\n".join(problems))
    return 0
