"""llama-orchestrator: a Docker-like control plane for llama.cpp llama-server processes."""

__version__ = "0.1.0"
