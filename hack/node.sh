#!/usr/bin/env bash
# The local cluster's node: containerd (Debian's, with runc and the CNI
# plugins), a kubelet and kube-scheduler built from the same Kubernetes release
# as the API server. Called by hack/cluster.sh (up/down/status) after the
# control plane is up and before it stops; not meant to be run alone.
#
# Everything lives below $NUBES_STATE/node: containerd's root and state, the
# kubelet's root (pod volumes), CNI configuration and IP allocations, logs.
# Pods' cgroups go below a cgroup named after the state directory, so two
# checkouts' nodes never share one. `down` deletes the pods through the API
# (the kubelet tears down their sandboxes and networks), stops the daemons,
# kills what is left, unmounts what the kubelet mounted, removes the cgroups
# and the CNI bridge.
#
# The kubelet serves on loopback only; the API server reaches it by the node's
# host name (logs, exec), which these machines resolve to 127.0.0.1. The node
# address (status.hostIP, the host network pods' podIP) is the host's own.
#
# These hosts mount cgroup v1 (plus a cgroup2 `unified` hierarchy) and have no
# systemd: the kubelet runs with `failCgroupV1: false` and the cgroupfs driver.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state=${NUBES_STATE:-$root/.nubes}
pki=$state/pki
logs=$state/logs
run=$state/run
node=$state/node
api_port=${NUBES_APISERVER_PORT:-16443}
node_name=${NUBES_NODE_NAME:-$(hostname)}
kubelet_port=${NUBES_KUBELET_PORT:-10250}
kubelet_healthz_port=${NUBES_KUBELET_HEALTHZ_PORT:-10248}
sched_port=${NUBES_SCHEDULER_PORT:-10359}
cni_bridge=${NUBES_CNI_BRIDGE:-nubes-cni0}
pod_cidr=${NUBES_POD_CIDR:-10.244.0.0/24}
cgroup_root=nubes-$(printf '%s' "$state" | sha256sum | cut -c1-8)
sock=$node/containerd/containerd.sock
bin=${NUBES_TOOLS_BIN:-$("$root/hack/build-tools.sh" | tail -n 1)}

log() { echo "node: $*" >&2; }
alive() { [[ -f $run/$1.pid ]] && kill -0 "$(cat "$run/$1.pid")" 2>/dev/null; }

start() { # name command... (as hack/cluster.sh: no inherited files beyond stdio)
  local name=$1; shift
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if ((fd > 2)); then eval "exec $fd>&-"; fi
    done
    exec nohup "$@" >"$logs/$name.log" 2>&1
  ) &
  echo $! > "$run/$name.pid"
}

stop() { # name
  alive "$1" || { rm -f "$run/$1.pid"; return 0; }
  local pid; pid=$(cat "$run/$1.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$run/$1.pid"
}

wait_for() { # what seconds command...
  local what=$1 secs=$2; shift 2
  for _ in $(seq $((secs * 5))); do "$@" && return 0; sleep 0.2; done
  log "$what did not come up; last log lines:"; tail -n 20 "$logs/$what.log" >&2 || true
  return 1
}

sign() { # name subject: a client certificate from the cluster CA
  [[ -f $pki/$1.crt ]] && return
  openssl genrsa -out "$pki/$1.key" 2048 2>/dev/null
  openssl req -new -key "$pki/$1.key" -subj "$2" -out "$pki/$1.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > "$pki/$1.ext"
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -extfile "$pki/$1.ext" -out "$pki/$1.crt" 2>/dev/null
  rm -f "$pki/$1.csr" "$pki/$1.ext"
}

kubeconfig() { # file user
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: nubes-local
  cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$pki/ca.crt"}
users:
- name: $2
  user: {client-certificate: "$pki/$2.crt", client-key: "$pki/$2.key"}
contexts:
- name: nubes-local
  context: {cluster: nubes-local, user: $2}
current-context: nubes-local
KC
}

write_config() {
  mkdir -p "$node/containerd" "$node/cni/net.d" "$node/kubelet" "$node/pod-logs"
  cat > "$node/containerd/config.toml" <<EOF
version = 2
root = "$node/containerd/root"
state = "$node/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$node/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  # No registry is reachable: images are imported (hack/image.sh), the
  # sandbox image too.
  sandbox_image = "nubes.local/pause:1"
  # These machines refuse lowering oom_score_adj (runc fails "failed to
  # update /proc/self/oom_score_adj: Permission denied" for the kubelet's -998
  # of critical pods): clamp to containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$node/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node/cni/net.d"
EOF
  cat > "$node/cni/net.d/10-nubes.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "nubes-pods",
  "plugins": [
    {"type": "bridge", "bridge": "$cni_bridge", "isGateway": true, "ipMasq": false,
     "ipam": {"type": "host-local", "dataDir": "$node/cni/ipam",
              "ranges": [[{"subnet": "$pod_cidr"}]]}},
    {"type": "loopback"}
  ]
}
EOF
  cat > "$node/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 hosts without systemd.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$cgroup_root
containerRuntimeEndpoint: unix://$sock
address: 127.0.0.1
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $kubelet_healthz_port
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$pki/ca.crt"}
authorization: {mode: Webhook}
podLogsDir: $node/pod-logs
volumePluginDir: $node/kubelet/volume-plugins
failSwapOn: false
# A development machine's disk and images are not the node's to manage.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", imagefs.available: "1%"}
serializeImagePulls: false
EOF
}

make_cgroups() {
  local d
  for d in /sys/fs/cgroup/*/; do
    [[ -d $d ]] && mkdir -p "$d$cgroup_root"
  done
}

remove_cgroups() {
  local d
  for d in /sys/fs/cgroup/*/"$cgroup_root"; do
    [[ -d $d ]] || continue
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [[ -d $d ]] && log "cgroup $d is still in use"
  done
  return 0
}

ctr_() { ctr -a "$sock" -n k8s.io "$@"; }

up() {
  mkdir -p "$logs" "$run"
  sign "kubelet-$node_name" "/O=system:nodes/CN=system:node:$node_name"
  sign scheduler "/CN=system:kube-scheduler"
  mkdir -p "$node"
  kubeconfig "$node/kubelet.kubeconfig" "kubelet-$node_name"
  kubeconfig "$state/scheduler.kubeconfig" scheduler
  write_config
  alive kube-scheduler || start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$state/scheduler.kubeconfig" --authentication-kubeconfig "$state/scheduler.kubeconfig" \
    --authorization-kubeconfig "$state/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$sched_port" --leader-elect=false --v 1
  alive containerd || start containerd containerd --config "$node/containerd/config.toml"
  wait_for containerd 30 ctr_ version >/dev/null 2>&1
  # The sandbox image, once per containerd root.
  ctr_ images ls -q | grep -qx nubes.local/pause:1 \
    || ctr_ images import "$("$root/hack/image.sh" pause)" >/dev/null
  make_cgroups
  alive kubelet || start kubelet "$bin/kubelet" --config "$node/kubelet.yaml" \
    --kubeconfig "$node/kubelet.kubeconfig" --root-dir "$node/kubelet" \
    --hostname-override "$node_name" --v 1
  wait_for kubelet 60 curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$kubelet_healthz_port/healthz" 2>/dev/null
  log "node $node_name up (containerd $sock, kubelet :$kubelet_port)"
}

down() {
  local kubectl=("$bin/kubectl" --kubeconfig "$state/kubeconfig")
  # The pods go first, through the API, so that the kubelet stops their
  # containers and tears down their sandboxes (CNI DEL). The workload
  # controllers are stopped by the caller before, so nothing recreates them.
  if alive kubelet && "${kubectl[@]}" get --raw /readyz >/dev/null 2>&1; then
    "${kubectl[@]}" delete pods --all -A --grace-period=5 --wait=false >/dev/null 2>&1 || true
    for _ in $(seq 120); do
      [[ -z $("${kubectl[@]}" get pods -A -o name --field-selector "spec.nodeName=$node_name" 2>/dev/null) ]] && break
      sleep 0.5
    done
    # The kubelet removes stopped sandboxes shortly after their pods went.
    for _ in $(seq 60); do [[ -z $(ctr_ tasks ls -q 2>/dev/null) ]] && break; sleep 0.5; done
  fi
  stop kubelet
  stop kube-scheduler
  if alive containerd; then
    local id
    for id in $(ctr_ tasks ls -q 2>/dev/null); do
      ctr_ tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr_ tasks ls -q 2>/dev/null); do
      for _ in $(seq 50); do ctr_ tasks delete "$id" >/dev/null 2>&1 && break; sleep 0.1; done
    done
    for id in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$id" >/dev/null 2>&1 || true; done
  fi
  stop containerd
  # What the kubelet mounted for pods (service-account tokens, ...), deepest first.
  local m
  while read -r m; do umount -l "$m" 2>/dev/null || true; done < <(
    awk -v p="$node/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r)
  remove_cgroups
  if ip link show "$cni_bridge" >/dev/null 2>&1; then ip link delete "$cni_bridge" || true; fi
  rm -rf "$node/kubelet" "$node/cni/ipam" "$node/containerd/state" "$node/pod-logs"
  log "node stopped"
}

status() {
  local name
  for name in containerd kubelet kube-scheduler; do
    if alive "$name"; then echo "$name: running (pid $(cat "$run/$name.pid"))"; else echo "$name: stopped"; fi
  done
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status (called by hack/cluster.sh)" >&2; exit 2 ;;
esac
