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
exec hack/with-cluster.sh .venv/bin/python -m pytest tests "$@"
