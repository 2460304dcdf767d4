#!/usr/bin/env bash
# The test command behind `make test`: static checks, CRD drift, then the
# unit and integration tests against a real control plane and node daemons.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy -p nubes.runtime -p nubes.api -p nubes.controllers -p nubes.drivers -p nubes.agent
.venv/bin/lint-imports
.venv/bin/nubes crds check crds
# The suite's cluster needs no node: the Helm install test starts a cluster
# with a node of its own (tests/integration/test_helm_install.py).
export NUBES_NODE=${NUBES_NODE:-0}
exec hack/with-cluster.sh .venv/bin/python -m pytest tests "$@"
