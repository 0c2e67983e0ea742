"""The operator tests use the session's control plane and cluster (tests/conftest.py)."""
