"""Local development environments: a real control plane, later a simulated cluster."""
