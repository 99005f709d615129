"""Test fixtures shipped with the package: a fake llama-server and a tiny GGUF model writer."""
