"""Contract tests: what the package promises against what it talks to (the storage contract
on every backend's real server, the file format against tensorizer and vLLM's own tensorizer
code) and the repository's rules (structure, layers, docs)."""
