"""flowmap: learn a Kubernetes cluster's network topology from its packets."""
