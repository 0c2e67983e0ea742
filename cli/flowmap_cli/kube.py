"""Where the user's commands reach the cluster: the user's kubeconfig (file, context, and the
context's namespace) or, inside a pod, its ServiceAccount; nothing else.

One place for it, so that ``flowmap graph`` and ``flowmap capture`` agree on which credentials
they use (client certificates, tokens, exec plugins: whatever the kubeconfig says, through the
``kubernetes`` client) and never write to the user's kubeconfig.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ClusterError(RuntimeError):
    """The cluster could not be reached, or refused; the message is one line for the user."""


@dataclass(frozen=True)
class Source:
    """Where the API is read from: a kubeconfig (file and context) or the in-cluster account."""

    kubeconfig: str | None = None
    context: str | None = None

    def _files(self) -> str:
        return self.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"

    def _in_cluster(self) -> bool:
        found = any(Path(f).expanduser().is_file() for f in self._files().split(os.pathsep) if f)
        return not found and not self.kubeconfig and not self.context and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` with the kubeconfig's (or the pod's) credentials."""
        try:
            from kubernetes import client, config  # here: a command's --help stays fast
        except ImportError:
            raise ClusterError("this command needs the Kubernetes client: pip install 'flowmap[cli]'") from None

        cfg = client.Configuration()
        files = self._files()
        try:
            if self._in_cluster():
                config.load_incluster_config(client_configuration=cfg)
            else:
                config.load_kube_config(config_file=files, context=self.context, client_configuration=cfg,
                                        persist_config=False)  # never write to the user's kubeconfig
        except (config.ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
            raise ClusterError(f"no usable Kubernetes configuration ({files}): {exc}") from None
        return client.ApiClient(cfg)

    def client(self) -> Any:
        """A ``CustomObjectsApi`` on :meth:`api_client`."""
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client())

    def namespace(self) -> str:
        """The context's namespace (kubectl's default for ``-n``); in a pod, its own; else default."""
        if self._in_cluster():
            try:
                return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
            except OSError:
                return "default"
        try:
            from kubernetes import config

            contexts, current = config.list_kube_config_contexts(config_file=self._files())
        except ImportError:
            raise ClusterError("this command needs the Kubernetes client: pip install 'flowmap[cli]'") from None
        except (config.ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
            raise ClusterError(f"no usable Kubernetes configuration ({self._files()}): {exc}") from None
        chosen = next((c for c in contexts or [] if c.get("name") == self.context), None) if self.context else current
        if self.context and chosen is None:
            raise ClusterError(f"no context {self.context!r} in {self._files()}")
        return str(((chosen or {}).get("context") or {}).get("namespace") or "default")
