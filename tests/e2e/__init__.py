"""End-to-end tests: a vLLM engine started, or a command (the command line, a benchmark, a
README block, a fresh interpreter doing a load) run in a process of its own."""
