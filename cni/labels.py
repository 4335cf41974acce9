"""A pod's labels, from what the runtime gives the plugin (network policy selects endpoints by them).

    args.labels            {"app": "api"}           in the network config (the runtime's per-pod args)
    runtimeConfig.labels   {"app": "api"}           capability args; win over args.labels
    CNI_ARGS               K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web-1   -> namespace=ns, pod=web-1

`cluster` and `node` are the agent's own labels for every endpoint: a pod cannot set them.
"""

from __future__ import annotations

from typing import Any

from wiremesh.clustermesh import check_labels

CNI_ARG_LABELS = {"K8S_POD_NAMESPACE": "namespace", "K8S_POD_NAME": "pod"}


def pod_labels(conf: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    """The labels of the pod being added; ValueError names the bad one. CNI_ARGS' pod identity
    comes last: labels in the network config cannot pass for another namespace or pod."""
    out: dict[str, str] = {}
    for where, holder in (("args.labels", conf.get("args")), ("runtimeConfig.labels", conf.get("runtimeConfig"))):
        if isinstance(holder, dict) and "labels" in holder:
            out.update(check_labels(holder["labels"], where))
    for part in env.get("CNI_ARGS", "").split(";"):
        k, eq, v = part.partition("=")
        name = CNI_ARG_LABELS.get(k.strip()) if eq else None
        if name is None:
            continue
        try:
            out.update(check_labels({name: v.strip()}, "CNI_ARGS"))
        except ValueError:
            out.pop(name, None)  # (a pod name longer than a label value: no such label, never a wrong one)
    return check_labels(out, "labels")
