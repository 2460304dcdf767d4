# Nubes developer entry points. See README.md.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

export NUBES_STATE ?= $(CURDIR)/.nubes
export NUBES_CACHE ?= $(HOME)/.cache/nubes
export PATH := $(NUBES_CACHE)/bin:$(CURDIR)/.venv/bin:$(PATH)
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: help
help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

# --- set-up -----------------------------------------------------------------------

.PHONY: node-packages tools venv
node-packages: ## install the Debian packages the node agent drives
	hack/install-node-packages.sh

tools: ## build kube-apiserver, kubectl, etcd, helm into the cache (once per version)
	hack/build-tools.sh >/dev/null

venv: ## create .venv with nubes and the dev tools
	hack/venv.sh

.PHONY: setup
setup: node-packages tools venv

# --- code -------------------------------------------------------------------------

.PHONY: lint crds crds-check
lint: venv ## ruff, mypy, import contracts
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy -p nubes.runtime -p nubes.api -p nubes.controllers -p nubes.drivers -p nubes.agent
	.venv/bin/lint-imports

crds: venv ## regenerate crds/ from the models
	.venv/bin/nubes crds write crds

crds-check: venv ## fail when crds/ drifted from the models
	.venv/bin/nubes crds check crds

# --- local cluster and node ---------------------------------------------------------

.PHONY: cluster-up cluster-down node-daemons node-daemons-stop
cluster-up: tools ## start (or reuse) the local control plane
	hack/cluster.sh up

cluster-down: ## stop the local control plane
	hack/cluster.sh down

node-daemons: node-packages ## start libvirtd, Open vSwitch and tgtd if not running
	hack/node-daemons.sh start

node-daemons-stop: ## stop the node daemons this checkout started
	hack/node-daemons.sh stop

# --- main job and tests ----------------------------------------------------------------

.PHONY: demo demo-local demo-down test test-unit
demo: setup ## local cluster with a kubelet node, helm install of the Nubes image, then the quickstart
	hack/demo.sh up

demo-local: setup ## the same with the controller and agent as local processes (development)
	NUBES_DEMO_MODE=local hack/demo.sh up

demo-down: ## delete the quickstart, stop controller, agent and control plane
	hack/demo.sh down

test: setup ## the whole suite: lint, CRD drift, unit and integration tests
	hack/test.sh $(PYTEST_ARGS)

test-unit: venv ## unit tests only (no daemons, no API server)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# --- benchmarks ------------------------------------------------------------------------

.PHONY: bench-ports bench-boot bench-volumes bench-secgroups
bench-ports: setup ## 1,000 ports in a /20: ports/s, duplicates, controller peak RSS
	hack/with-cluster.sh $(PY) -m bench.ports

bench-boot: setup ## boot latency p50/p95 against raw QEMU and libvirt alone
	hack/with-cluster.sh $(PY) -m bench.boot

bench-volumes: setup ## volume create and secure-wipe throughput
	hack/with-cluster.sh $(PY) -m bench.volumes

bench-secgroups: setup ## 200 ports in 20 groups: membership change to rule in force p50/p95, rules per port
	hack/with-cluster.sh $(PY) -m bench.secgroups

.PHONY: bench-netpass bench-scale bench-l3
bench-netpass: setup ## CPU of one networking pass on a node's switch (100 VIFs), no cluster
	$(PY) -m bench.netpass

bench-l3: setup ## floating IP applied to first reply through it p50/p95 (20), L3 node failover time
	hack/with-cluster.sh $(PY) -m bench.l3

bench-scale: setup ## 10,000 ports + 1,000 instances: controller/agent RSS, restart-to-converged time
	hack/with-cluster.sh $(PY) -m bench.scale
