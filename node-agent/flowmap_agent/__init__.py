"""The node agent: ties sessions to pods and workloads and reports them to the operator."""
