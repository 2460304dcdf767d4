#!/usr/bin/env bash
# Run a command with the control plane and the node daemons up; afterwards
# stop whatever this script had to start (a cluster that was already running,
# or the user's KUBECONFIG cluster, is left alone).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state=${NUBES_STATE:-$root/.nubes}
cluster_started=0
if [[ -z ${KUBECONFIG:-} ]] && ! "$root/hack/cluster.sh" status | grep 'kube-apiserver: running' >/dev/null; then
  cluster_started=1
fi
before=$(cat "$state/run/node-daemons.started" 2>/dev/null || true)
cleanup() {
  local rc=$?
  if [[ -z $before ]]; then "$root/hack/node-daemons.sh" stop || true; fi
  if ((cluster_started)); then "$root/hack/cluster.sh" down || true; fi
  exit $rc
}
trap cleanup EXIT
"$root/hack/cluster.sh" up
"$root/hack/node-daemons.sh" start
export KUBECONFIG=${KUBECONFIG:-$state/kubeconfig}
"$@"
