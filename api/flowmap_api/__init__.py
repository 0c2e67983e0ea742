"""The gRPC contract between agents and the operator (generated code lives here)."""
