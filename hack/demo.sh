#!/usr/bin/env bash
# The main job: a local control plane and node services, the CRDs and the
# chart's roles and policies, the controller and a node agent as local
# processes, then the quickstart, and what came of it.
#
#   hack/demo.sh up     (make demo)
#   hack/demo.sh down   (make demo-down)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
state=${NUBES_STATE:-$root/.nubes}
bin=$(hack/build-tools.sh | tail -n 1)
# cluster.sh takes a set KUBECONFIG to mean "use the user's cluster".
user_kubeconfig=${KUBECONFIG:-}
export KUBECONFIG=${KUBECONFIG:-$state/kubeconfig}
kubectl() { "$bin/kubectl" "$@"; }
node=${NUBES_DEMO_NODE:-$(hostname)}
node_state=$state/node
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
  say "control plane and node daemons"
  KUBECONFIG=$user_kubeconfig hack/cluster.sh up
  hack/node-daemons.sh start

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
    --run-dir "$state/run/agent" --image-store "$state/images" --health-port 18082
  for port in 18081 18082; do
    for _ in $(seq 150); do curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null && break; sleep 0.2; done
  done
  echo "logs: $state/logs/controller.log $state/logs/agent.log"

  say "quickstart (examples/quickstart)"
  kubectl apply -f examples/quickstart/00-project.yaml
  # Ready once the API server's quota system counts the project's kinds (the
  # resourcequota controller finds new CRDs on its 30 s discovery resync).
  kubectl wait --for=condition=Ready project/demo --timeout=180s
  kubectl apply -f examples/quickstart/
  kubectl wait --for=condition=Ready -n demo image/nubes-guest network/private subnet/private-v4 --timeout=180s
  kubectl wait --for=condition=Ready -n demo instance/demo-vm --timeout=300s
  kubectl get nubes -n demo

  say "demo-vm's serial console (kubectl get configmap demo-vm-console -n demo)"
  for _ in $(seq 60); do
    console=$(kubectl get configmap demo-vm-console -n demo -o jsonpath='{.data.console\.log}' 2>/dev/null || true)
    grep -q "nubes-guest: ready" <<<"$console" && break
    sleep 2
  done
  grep -E "^(nubes-guest: (boot|lease|hostname|ready|disk)|hello from)" <<<"$console" || true

  say "invalid input is refused by the API server (examples/invalid)"
  for f in examples/invalid/*.yaml; do
    printf -- '- %s: ' "$(basename "$f")"
    kubectl apply --dry-run=server -f "$f" 2>&1 | tail -n 1 || true
  done
  say "done: KUBECONFIG=$KUBECONFIG kubectl get nubes -n demo; make demo-down to clean up"
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
  stop_proc agent
  stop_proc controller
  stop_proc http
  hack/node-daemons.sh stop
  hack/cluster.sh down
}

case ${1:-up} in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
