"""Label keys shared by the webhook and the Kubernetes manifests in `packaging/`.

The MutatingWebhookConfiguration selects pods and namespaces by ON_DEMAND_LABEL and the
patched pods are steered by NODE_LABEL, so the Python code and the YAML must agree on
these strings; the packaging tests check that they do.
"""

from __future__ import annotations

ON_DEMAND_LABEL = "acceld.io/on-demand"
"""On a pod or namespace: run its pods on accelerated images when they exist."""

NODE_LABEL = "acceld.io/enabled"
"""On a node: the acceld agent runs here (the DaemonSet's nodeSelector)."""

OPTED_IN = "true"
OPTED_OUT = "false"
