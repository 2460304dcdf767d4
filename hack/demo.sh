#!/usr/bin/env bash
# The main job: a local cluster with a kubelet node and the node services,
# Nubes installed with `helm install` from the image hack/image.sh builds (the
# controller and the agent as Pods), then the quickstart, and what came of it.
#
#   hack/demo.sh up          (make demo)
#   hack/demo.sh down        (make demo-down)
#   NUBES_DEMO_MODE=local hack/demo.sh up   (make demo-local: the chart's
#       cluster objects, the controller and agent as local processes from .venv,
#       for development; also the mode for a KUBECONFIG of another cluster,
#       whose nodes cannot get the locally built image)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
state=${NUBES_STATE:-$root/.nubes}
bin=$(hack/build-tools.sh | tail -n 1)
# cluster.sh takes a set KUBECONFIG to mean "use the user's cluster"; the
# local cluster's own kubeconfig (as the README says to export) is not that.
user_kubeconfig=${KUBECONFIG:-}
if [[ -n $user_kubeconfig && $(realpath -m "$user_kubeconfig") == $(realpath -m "$state/kubeconfig") ]]; then
  user_kubeconfig=
fi
mode=${NUBES_DEMO_MODE:-helm}
[[ -z $user_kubeconfig ]] || mode=local
export KUBECONFIG=${KUBECONFIG:-$state/kubeconfig}
kubectl() { "$bin/kubectl" "$@"; }
node=${NUBES_DEMO_NODE:-$(hostname)}
# The agent's state (instances, image cache, volumes); $state/node is the
# kubelet node's (hack/node.sh).
node_state=$state/hypervisor
mkdir -p "$state/logs" "$state/run" "$node_state"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

start_proc() { # name args...
  local name=$1; shift
  if [[ -f $state/run/$name.pid ]] && kill -0 "$(cat "$state/run/$name.pid")" 2>/dev/null; then
    return
  fi
  nohup .venv/bin/nubes "$@" >"$state/logs/$name.log" 2>&1 &
  echo $! > "$state/run/$name.pid"
}

stop_proc() {
  local pidfile=$state/run/$1.pid
  [[ -f $pidfile ]] || return 0
  local pid; pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

up() {
  say "control plane, kubelet node and node daemons"
  KUBECONFIG=$user_kubeconfig hack/cluster.sh up
  hack/node-daemons.sh start
  if [[ $mode == helm ]]; then
    kubectl wait --for=condition=Ready node --all --timeout=120s >/dev/null
    kubectl get nodes
    helm_up
  else
    local_up
  fi
  quickstart
}

helm_up() {
  say "Nubes image (hack/image.sh), into the node's containerd"
  local ref
  ref=$(hack/image.sh load "$state/node/containerd/containerd.sock")
  echo "$ref"

  say "guest image (hack/guest-image), served on loopback for the quickstart Image"
  guest=$(hack/guest-image/build.sh | tail -n 1)
  start_http "$(dirname "$guest")"

  say "helm install nubes charts/nubes"
  # The local cluster has no kube-proxy: the Pods use the host network and
  # reach the API server on loopback. The quickstart image is served on
  # 127.0.0.2:18090; the import policy allows exactly that. --take-ownership:
  # CRDs and roles a `make demo-local`, a test or a benchmark applied to this
  # cluster before become the release's.
  local api_port=${NUBES_APISERVER_PORT:-16443}
  "$bin/helm" upgrade --install nubes charts/nubes --namespace nubes-system --create-namespace \
    --take-ownership --set image.repository="${ref%:*}" --set image.tag="${ref##*:}" --set image.pullPolicy=Never \
    --set apiServer.host=127.0.0.1 --set apiServer.port="$api_port" \
    --set controller.hostNetwork=true --set controller.healthPort=18081 --set agent.healthPort=18082 \
    --set controller.imageStore.hostPath="$state/images" \
    --set 'controller.imageImport.allowNetworks={127.0.0.2/32}' --set 'controller.imageImport.ports={18090}' \
    --set agent.stateDir="$node_state" --set agent.runDir="$state/run/agent" \
    --set 'agent.bridgeMappings={external:br-ex}' \
    --wait --timeout 5m 2>&1 | grep -v 'found symbolic link' | sed -n '1,6p'
  # helm's --wait may see the DaemonSet before its status counts the new Pod.
  kubectl rollout status daemonset/nubes-agent statefulset/nubes-controller -n nubes-system --timeout=180s >/dev/null
  kubectl wait --for=condition=Ready pod --all -n nubes-system --timeout=180s >/dev/null
  kubectl get pods -n nubes-system -o wide
  echo "kinds: $(kubectl api-resources --categories=nubes -o name | tr '\n' ' ')"
}

local_up() {
  say "CRDs, roles and admission policies"
  kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
  kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null
  # The components' namespace: their ServiceAccounts and the CHAP Secrets.
  kubectl create namespace nubes-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  "$bin/helm" template nubes charts/nubes --namespace nubes-system \
    --set controller.enabled=false --set agent.enabled=false --set crds.enabled=false \
    | kubectl apply --server-side --force-conflicts -f - >/dev/null
  echo "kinds: $(kubectl api-resources --categories=nubes -o name | tr '\n' ' ')"

  say "guest image (hack/guest-image), served on loopback for the quickstart Image"
  guest=$(hack/guest-image/build.sh | tail -n 1)
  start_http "$(dirname "$guest")"

  say "controller and node agent ($node)"
  # The quickstart image is served on 127.0.0.2:18090; the import policy
  # allows exactly that (loopback is refused otherwise, as every non-public address).
  start_proc controller --log-level info controller --health-port 18081 --image-store "$state/images" \
    --image-import-allow-network 127.0.0.2/32 --image-import-port 18090
  start_proc agent --log-level info agent --node "$node" --state-dir "$node_state" \
    --run-dir "$state/run/agent" --image-store "$state/images" --health-port 18082 \
    --bridge-mapping external:br-ex --l3
  for port in 18081 18082; do
    for _ in $(seq 150); do curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null && break; sleep 0.2; done
  done
  echo "logs: $state/logs/controller.log $state/logs/agent.log"
}

quickstart() {
  say "external host: namespace nubes-upstream on br-ex, 203.0.113.1 (hack/upstream.sh)"
  hack/upstream.sh up
  say "quickstart (examples/quickstart)"
  kubectl apply -f examples/quickstart/00-project.yaml
  # Ready once the API server's quota system counts the project's kinds (the
  # resourcequota controller finds new CRDs on its 30 s discovery resync).
  kubectl wait --for=condition=Ready project/demo --timeout=180s
  # The floating IP comes last, to show SNAT (the router's address) first.
  local f
  for f in examples/quickstart/*.yaml; do
    [[ $f == */45-floating-ip.yaml ]] || kubectl apply -f "$f"
  done
  kubectl wait --for=condition=Ready -n demo image/nubes-guest network/private subnet/private-v4 router/demo-router --timeout=180s
  kubectl wait --for=condition=Ready -n demo instance/demo-vm --timeout=300s
  kubectl get nubes -n demo

  say "demo-vm's serial console (kubectl get configmap demo-vm-console -n demo)"
  console=$(console_with "nubes-guest: ready" 60)
  grep -E "^(nubes-guest: (boot|lease|hostname|ready|disk)|hello from)" <<<"$console" || true
  routed

  say "invalid input is refused by the API server (examples/invalid)"
  for f in examples/invalid/*.yaml; do
    printf -- '- %s: ' "$(basename "$f")"
    kubectl apply --dry-run=server -f "$f" 2>&1 | tail -n 1 || true
  done
  say "done: KUBECONFIG=$KUBECONFIG kubectl get nubes -n demo; make demo-down to clean up"
}

console_with() { # pattern tries: demo-vm's console once it shows the pattern (or the last seen)
  local console
  for _ in $(seq "$2"); do
    console=$(kubectl get configmap demo-vm-console -n demo -o jsonpath='{.data.console\.log}' 2>/dev/null || true)
    grep -q "$1" <<<"$console" && break
    sleep 2
  done
  printf '%s\n' "$console"
}

routed() {
  local gateway console fip page
  gateway=$(kubectl get router demo-router -n demo -o jsonpath='{.status.gatewayIp}')
  say "from inside: demo-vm reaches 203.0.113.1 through the router's SNAT (gateway $gateway)"
  console=$(console_with "^upstream 203.0.113.1 says" 90)
  grep "^upstream 203.0.113.1 says" <<<"$console" || echo "demo-vm's console shows no answer from 203.0.113.1"

  say "from outside: 203.0.113.1 reaches demo-vm through its floating IP"
  kubectl apply -f examples/quickstart/45-floating-ip.yaml
  kubectl wait --for=condition=Ready -n demo floatingip/demo-vm --timeout=120s
  fip=$(kubectl get floatingip demo-vm -n demo -o jsonpath='{.status.floatingIpAddress}')
  kubectl get routers,floatingips -n demo
  echo "demo-vm's addresses: $(kubectl get instance demo-vm -n demo -o jsonpath='{.status.addresses[*].ipAddresses[*]} floating {.status.addresses[*].floatingIpAddresses[*]}')"
  page=
  for _ in $(seq 30); do
    page=$(hack/upstream.sh fetch "http://$fip/" 2>/dev/null) && break
    sleep 1
  done
  echo "nubes-upstream# curl http://$fip/  ->  ${page:-no answer}"
}

start_http() { # directory
  if [[ -f $state/run/http.pid ]] && kill -0 "$(cat "$state/run/http.pid")" 2>/dev/null; then return; fi
  nohup .venv/bin/python -m http.server 18090 --bind 127.0.0.2 --directory "$1" \
    >"$state/logs/http.log" 2>&1 &
  echo $! > "$state/run/http.pid"
}

down() {
  if [[ -n $user_kubeconfig ]] || hack/cluster.sh status | grep 'kube-apiserver: running' >/dev/null; then
    kubectl delete -f examples/quickstart/ --ignore-not-found --wait=true --timeout=180s || true
    # The agent removes domains, disks and ports before the namespace goes.
    kubectl wait --for=delete namespace/demo --timeout=180s 2>/dev/null || true
  fi
  if [[ -z $user_kubeconfig ]] && hack/cluster.sh status | grep 'kube-apiserver: running' >/dev/null \
    && "$bin/helm" status nubes -n nubes-system >/dev/null 2>&1; then
    "$bin/helm" uninstall nubes -n nubes-system --wait --timeout 3m || true
  fi
  stop_proc agent
  stop_proc controller
  stop_proc http
  hack/upstream.sh down
  hack/node-daemons.sh stop
  hack/cluster.sh down
}

case ${1:-up} in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
