#!/usr/bin/env bash
# A local Kubernetes control plane on loopback: etcd, kube-apiserver (RBAC,
# ValidatingAdmissionPolicy, service-account token signing) and a
# kube-controller-manager running only the namespace, garbage-collector,
# service-account, resource-quota and CSR-signing controllers (no kubelet:
# nothing here runs pods). The CSR signer signs with the cluster CA, so client
# certificates issued through the CertificateSigningRequest API (`nubes
# credentials issue`) authenticate to this API server.
#
# With NUBES_NODE=1 (the default) the cluster also gets a node (hack/node.sh:
# containerd, kubelet, kube-scheduler) and the controller-manager runs the
# workload controllers (Deployments, ReplicaSets, StatefulSets, DaemonSets,
# Jobs: the chart's uninstall hook),
# so `helm install` runs Pods. NUBES_NODE=0 keeps the bare control plane.
#
#   hack/cluster.sh up      start, or reuse the one already running
#   hack/cluster.sh down    stop and wipe etcd data
#   hack/cluster.sh status
#
# State lives in $NUBES_STATE (default .nubes/ in the repo); the admin
# kubeconfig is $NUBES_STATE/kubeconfig. If KUBECONFIG is set, `up` only checks
# that the cluster answers and uses it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state=${NUBES_STATE:-$root/.nubes}
api_port=${NUBES_APISERVER_PORT:-16443}
etcd_port=${NUBES_ETCD_PORT:-12379}
etcd_peer_port=$((etcd_port + 1))
kcm_port=${NUBES_KCM_PORT:-10357}
pki=$state/pki
logs=$state/logs
run=$state/run
kubeconfig=$state/kubeconfig
with_node=${NUBES_NODE:-1}

log() { echo "cluster: $*" >&2; }

tools_bin() { "$root/hack/build-tools.sh" | tail -n 1; }

alive() { [[ -f $run/$1.pid ]] && kill -0 "$(cat "$run/$1.pid")" 2>/dev/null; }

api_ready() {
  curl -fsS --max-time 2 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1
}

make_pki() {
  [[ -f $pki/admin.crt ]] && return
  mkdir -p "$pki"
  local d=$pki
  openssl genrsa -out "$d/ca.key" 2048 2>/dev/null
  openssl req -x509 -new -key "$d/ca.key" -subj "/CN=nubes-local-ca" -days 3650 -out "$d/ca.crt" 2>/dev/null
  sign() { # name subject [san]
    openssl genrsa -out "$d/$1.key" 2048 2>/dev/null
    openssl req -new -key "$d/$1.key" -subj "$2" -out "$d/$1.csr" 2>/dev/null
    local ext=$d/$1.ext
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n' > "$ext"
    if [[ -n ${3:-} ]]; then
      printf 'extendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$3" >> "$ext"
    else
      printf 'extendedKeyUsage=clientAuth\n' >> "$ext"
    fi
    openssl x509 -req -in "$d/$1.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
      -days 3650 -extfile "$ext" -out "$d/$1.crt" 2>/dev/null
    rm -f "$d/$1.csr" "$ext"
  }
  sign apiserver "/CN=kube-apiserver" "IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc"
  sign admin "/O=system:masters/CN=nubes-admin"
  # Only the namespace and garbage-collector controllers run; they act for
  # every kind, so the local control plane gives them full rights.
  sign kcm "/O=system:masters/CN=system:kube-controller-manager"
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

write_kubeconfig() { # file user cert key
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: nubes-local
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: $2
  user:
    client-certificate: $3
    client-key: $4
contexts:
- name: nubes-local
  context: {cluster: nubes-local, user: $2}
current-context: nubes-local
KC
}

start() { # name command...
  local name=$1; shift
  # The daemons outlive this script: they must not inherit its open files
  # beyond stdio (`flock /tmp/nubes-test.lock hack/with-cluster.sh ...` would
  # otherwise leave the test lock held by etcd and the API server for good).
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if ((fd > 2)); then eval "exec $fd>&-"; fi
    done
    exec nohup "$@" >"$logs/$name.log" 2>&1
  ) &
  echo $! > "$run/$name.pid"
}

wait_for() { # what seconds command...
  local what=$1 secs=$2; shift 2
  for _ in $(seq $((secs * 5))); do "$@" && return 0; sleep 0.2; done
  log "$what did not come up; last log lines:"; tail -n 20 "$logs/$what.log" >&2 || true
  return 1
}

up() {
  # The local cluster's own kubeconfig (exported as the README says) is not
  # "the user's cluster": start it when it is down.
  if [[ -n ${KUBECONFIG:-} && $(realpath -m "$KUBECONFIG") == $(realpath -m "$kubeconfig") ]]; then
    unset KUBECONFIG
  fi
  if [[ -n ${KUBECONFIG:-} ]]; then
    "$(tools_bin)/kubectl" version >/dev/null || { log "KUBECONFIG=$KUBECONFIG does not answer"; exit 1; }
    log "using the cluster of KUBECONFIG=$KUBECONFIG"
    return
  fi
  mkdir -p "$logs" "$run"
  if alive kube-apiserver && api_ready; then
    log "reusing the running control plane ($kubeconfig)"
    # Only a control plane started with the node's flags (Node authorizer,
    # workload controllers) gets the node back.
    if ((with_node)) && [[ -f $run/with-node ]] && ! alive kubelet; then
      NUBES_TOOLS_BIN=$(tools_bin) "$root/hack/node.sh" up
    fi
    return
  fi
  local bin; bin=$(tools_bin)
  make_pki
  alive etcd || start etcd "$bin/etcd" --name nubes --data-dir "$state/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "nubes=http://127.0.0.1:$etcd_peer_port" \
    --unsafe-no-fsync --quota-backend-bytes 4294967296 --log-level warn
  wait_for etcd 30 curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$etcd_port/health" 2>/dev/null
  # GOGC: with a small heap, Go's collector ran at a third of the API
  # server's CPU under a burst of writes (bench-ports); memory is cheaper
  # here than the second core.
  alive kube-apiserver || start kube-apiserver env GOGC="${NUBES_APISERVER_GOGC:-400}" "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NamespaceLifecycle,ServiceAccount,NodeRestriction,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook,MutatingAdmissionWebhook,ResourceQuota \
    --kubelet-client-certificate "$pki/admin.crt" --kubelet-client-key "$pki/admin.key" \
    --kubelet-preferred-address-types Hostname,InternalIP --allow-privileged=true \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/24 \
    --max-requests-inflight 800 --max-mutating-requests-inflight 400 \
    --profiling=false --v 1
  write_kubeconfig "$kubeconfig" nubes-admin "$pki/admin.crt" "$pki/admin.key"
  wait_for kube-apiserver 90 api_ready
  write_kubeconfig "$state/kcm.kubeconfig" kcm "$pki/kcm.crt" "$pki/kcm.key"
  alive kube-controller-manager || start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$state/kcm.kubeconfig" --authentication-kubeconfig "$state/kcm.kubeconfig" \
    --authorization-kubeconfig "$state/kcm.kubeconfig" \
    --controllers "namespace,garbagecollector,serviceaccount,serviceaccount-token,resourcequota,csrsigning$(
      if ((with_node)); then echo ,deployment,replicaset,statefulset,daemonset,job,podgc,root-ca-cert-publisher,nodelifecycle; fi)" \
    --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" --leader-elect=false \
    --concurrent-gc-syncs 5 --concurrent-namespace-syncs 5 --resource-quota-sync-period 10s --v 1
  rm -f "$run/with-node"
  if ((with_node)); then touch "$run/with-node"; NUBES_TOOLS_BIN=$bin "$root/hack/node.sh" up; fi
  log "control plane up: export KUBECONFIG=$kubeconfig"
}

down() {
  local name
  # The workload controllers stop before the node, so that the pods the node
  # deletes are not recreated; the API server stays up for the node's down.
  for name in kube-controller-manager; do
    if alive "$name"; then kill "$(cat "$run/$name.pid")" 2>/dev/null || true; fi
  done
  if [[ -f $run/kubelet.pid || -f $run/containerd.pid ]]; then
    NUBES_TOOLS_BIN=${NUBES_CACHE:-$HOME/.cache/nubes}/bin "$root/hack/node.sh" down
  fi
  for name in kube-controller-manager kube-apiserver etcd; do
    if alive "$name"; then
      local pid; pid=$(cat "$run/$name.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$run/$name.pid"
  done
  rm -rf "$state/etcd"
  rm -f "$run/with-node"
  log "control plane stopped"
}

status() {
  local name
  for name in etcd kube-apiserver kube-controller-manager; do
    if alive "$name"; then echo "$name: running (pid $(cat "$run/$name.pid"))"; else echo "$name: stopped"; fi
  done
  if [[ -f $run/with-node || -f $run/kubelet.pid || -f $run/containerd.pid ]]; then
    NUBES_TOOLS_BIN=${NUBES_CACHE:-$HOME/.cache/nubes}/bin "$root/hack/node.sh" status
  fi
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
