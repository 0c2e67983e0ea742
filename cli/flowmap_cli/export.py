"""``flowmap export``: the learned map of a namespace as YAML for git."""

from __future__ import annotations

import argparse
import sys
from typing import Any

MODES = ("Learn", "Monitor", "Protect")


def _export(args: argparse.Namespace) -> int:
    import yaml
    try:
        from kubernetes import client, config
    except ImportError:
        print("flowmap export: needs the Kubernetes client: pip install 'flowmap[cli]'", file=sys.stderr)
        return 1
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException

    from flowmap_operator.exporting import Inventory, learning_policies, network_policies
    from flowmap_operator.policy.rules import Policy

    try:
        try:
            config.load_kube_config(config_file=args.kubeconfig, context=args.context)
        except ConfigException:
            config.load_incluster_config()
        api = client.ApiClient()
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        pods = [api.sanitize_for_serialization(p) for p in core.list_pod_for_all_namespaces().items]
        nodes = [api.sanitize_for_serialization(n) for n in core.list_node().items]
        # The client annotates custom objects as `object` (OpenAPI's JSON object): they are dicts.
        groups = custom.list_cluster_custom_object("flowmap.dev", "v1alpha1", "groups")["items"]  # type: ignore[index]
        connections = custom.list_cluster_custom_object(  # type: ignore[index]
            "flowmap.dev", "v1alpha1", "connections")["items"]
        bodies = custom.list_namespaced_custom_object(  # type: ignore[index]
            "flowmap.dev", "v1alpha1", args.namespace, "networklearningpolicies")["items"]
    except (ApiException, ConfigException, OSError) as exc:
        reason = f"{exc.status} {exc.reason}" if isinstance(exc, ApiException) else str(exc)
        print(f"flowmap export: cannot read the cluster: {reason}", file=sys.stderr)
        return 1
    policies = []
    for body in bodies:
        policy = Policy(args.namespace, body["metadata"]["name"])
        policy.update(body)
        policy.load_status(body.get("status") or {})
        policies.append(policy)
    inventory = Inventory.build(pods, nodes, groups)
    docs: list[dict[str, Any]]
    warnings: list[str]
    if args.format == "nlp":
        docs, warnings = learning_policies(args.namespace, args.mode, inventory, connections, policies), []
    else:
        docs, warnings = network_policies(args.namespace, inventory, connections, policies)
    for warning in warnings:
        print(f"# warning: {warning}", file=sys.stderr)
    if not docs:
        print(f"flowmap export: no workloads in namespace {args.namespace!r}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    """``flowmap export --namespace NS [--format nlp|networkpolicy] [--mode MODE]``."""
    parser.add_argument("-n", "--namespace", required=True, help="the namespace whose workloads to export")
    parser.add_argument("--format", choices=("nlp", "networkpolicy"), default="nlp",
                        help="NetworkLearningPolicy spec.rules (default) or networking.k8s.io/v1 NetworkPolicy")
    parser.add_argument("--mode", choices=MODES, default="Monitor",
                        help="the mode of the exported NetworkLearningPolicies (default Monitor)")
    parser.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG, ~/.kube/config, in-cluster")
    parser.add_argument("--context", default=None)
    parser.set_defaults(func=_export)
