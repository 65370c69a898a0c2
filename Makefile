# The two commands a newcomer needs (see README.md).
.PHONY: demo test

# Install everything, then serialize a small local model and load it back through vLLM.
demo:
	scripts/install.sh
	.venv/bin/python examples/quickstart.py

# Install what the tests need, then run the whole suite (no GPU needed).
test:
	scripts/install.sh --test
	.venv/bin/python -m pytest
