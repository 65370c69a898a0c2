#!/usr/bin/env bash
# Run the engine-free tests against another vLLM wheel, in a venv of its own.
#
#   scripts/other_vllm.sh VERSION VENV [pytest args...]
#   e.g. scripts/other_vllm.sh 0.34.0 /work/venv-034
#
# The venv is made when missing (about 9 GB and a few minutes: vLLM's CUDA wheel and its torch),
# reused when present. This package goes in editable, with the test extra. The tests run with
# `-m "not slow"`: no engine starts (the CUDA wheel's `_C` has no CPU ops, so none can run here;
# docs/compatibility.md). What the CUDA wheel needs on a machine without a GPU:
# - vllm 0.34.0 pins flashinfer-python==0.7.3, which the package index lacks: it is installed
#   with --no-deps and 0.7.2.post1 put in that pin's place;
# - VLLM_TARGET_DEVICE=cpu, so vLLM's engine argument parser picks a platform;
# - vllm.triton_utils.HAS_TRITON = True (0.34 builds an engine config only with Triton present):
#   a test-only stand-in set by tests/support/other_vllm_plugin.py, never by the package.
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -ge 2 ] || { echo "usage: scripts/other_vllm.sh VERSION VENV [pytest args...]" >&2; exit 2; }
version=$1 venv=$2
shift 2
log() { printf '[other_vllm] %s\n' "$*" >&2; }

python=${PYTHON:-python3}
if [ ! -f "$venv/.vllm-$version-installed" ]; then
    log "creating $venv with vllm==$version (several GB; minutes)"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
    "${pip[@]}" packaging
    "${pip[@]}" --no-deps "vllm==$version"
    # vLLM's own requirements, less the flashinfer pin the index cannot satisfy
    reqs=$("$venv/bin/python" - <<'PY'
import importlib.metadata as md
from packaging.requirements import Requirement
out = []
for text in md.requires("vllm") or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name == "flashinfer-python":
        continue
    req.marker = None
    out.append(str(req))
print("\n".join(out))
PY
)
    mapfile -t req_list <<<"$reqs"
    "${pip[@]}" "${req_list[@]}"
    if "$venv/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(not any(r.startswith("flashinfer-python") for r in m.requires("vllm") or []))'; then
        "${pip[@]}" --no-deps "flashinfer-python==0.7.2.post1" || "${pip[@]}" --no-deps flashinfer-python
    fi
    "${pip[@]}" -e ".[test]"
    touch "$venv/.vllm-$version-installed"
fi

installed=$("$venv/bin/python" -c 'import vllm; print(vllm.__version__)')
log "vllm $installed in $venv"
export VLLM_TARGET_DEVICE=cpu
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/python" -m pytest -m "not slow" -p tests.support.other_vllm_plugin -q "$@"
