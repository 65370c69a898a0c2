"""Checks and reports over written files: is_vllm_tensorized, check_shards, inspect
(headers only) and verify (every tensor's hash)."""
