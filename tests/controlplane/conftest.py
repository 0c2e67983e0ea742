"""The control-plane tests use the session's control plane (tests/conftest.py)."""
