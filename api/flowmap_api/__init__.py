"""The gRPC contract between agents and the operator (generated code lives here), and the rules
both sides keep alike: its limits and validity, one backoff (pacing), one settings reader
(settings). Nothing here imports grpc but the generated stubs: the rules stay importable alone."""
