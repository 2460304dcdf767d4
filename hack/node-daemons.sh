#!/usr/bin/env bash
# Start the node daemons the agent drives when they are not running (there is
# no init system on these machines): virtlogd + libvirtd, ovsdb-server +
# ovs-vswitchd (system instance, default paths), tgtd.
#
#   hack/node-daemons.sh start | stop | status
#
# `stop` stops only what `start` started (recorded in $NUBES_STATE/run).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state=${NUBES_STATE:-$root/.nubes}
started=$state/run/node-daemons.started
mkdir -p "$state/run"
touch "$started"

log() { echo "node-daemons: $*" >&2; }
record() { grep -qx "$1" "$started" || echo "$1" >> "$started"; }

libvirt_ok() { timeout 5 virsh -c qemu:///system version >/dev/null 2>&1; }
ovs_ok() { timeout 5 ovs-vsctl --timeout=3 show >/dev/null 2>&1 && [[ -S /var/run/openvswitch/db.sock ]] && pgrep -x ovs-vswitchd >/dev/null; }
tgt_ok() { timeout 5 tgtadm --lld iscsi --op show --mode sys >/dev/null 2>&1; }

wait_until() { local what=$1; shift; for _ in $(seq 100); do "$@" && return 0; sleep 0.1; done; log "$what did not start"; return 1; }

start() {
  if ! libvirt_ok; then
    mkdir -p /run/libvirt /var/log/libvirt
    pgrep -x virtlogd >/dev/null || { virtlogd -d; record virtlogd; }
    pgrep -x libvirtd >/dev/null || { libvirtd -d; record libvirtd; }
    wait_until libvirtd libvirt_ok
    log "libvirtd running"
  fi
  if ! ovs_ok; then
    mkdir -p /var/run/openvswitch /var/log/openvswitch /etc/openvswitch
    [[ -f /etc/openvswitch/conf.db ]] || ovsdb-tool create /etc/openvswitch/conf.db /usr/share/openvswitch/vswitch.ovsschema
    if ! pgrep -x ovsdb-server >/dev/null; then
      ovsdb-server /etc/openvswitch/conf.db --remote=punix:/var/run/openvswitch/db.sock \
        --pidfile=/var/run/openvswitch/ovsdb-server.pid --detach -vconsole:off --log-file=/var/log/openvswitch/ovsdb-server.log
      record ovsdb-server
    fi
    ovs-vsctl --no-wait init
    if ! pgrep -x ovs-vswitchd >/dev/null; then
      ovs-vswitchd unix:/var/run/openvswitch/db.sock --pidfile=/var/run/openvswitch/ovs-vswitchd.pid \
        --detach -vconsole:off --log-file=/var/log/openvswitch/ovs-vswitchd.log
      record ovs-vswitchd
    fi
    wait_until ovs-vswitchd ovs_ok
    log "openvswitch running"
  fi
  if ! tgt_ok; then
    pgrep -x tgtd >/dev/null || { tgtd; record tgtd; }
    wait_until tgtd tgt_ok
    log "tgtd running"
  fi
}

stop() {
  local name dev bridges=""
  # The userspace datapath makes a tap device per bridge (and ovs-netdev);
  # they outlive ovs-vswitchd, so remember the bridges while OVSDB answers.
  if grep -qx ovs-vswitchd "$started" 2>/dev/null; then
    bridges=$(timeout 5 ovs-vsctl --timeout=3 list-br 2>/dev/null || true)
  fi
  for name in tgtd ovs-vswitchd ovsdb-server libvirtd virtlogd; do
    if grep -qx "$name" "$started"; then
      pkill -x "$name" || true
      for _ in $(seq 50); do pgrep -x "$name" >/dev/null || break; sleep 0.1; done
      pkill -9 -x "$name" 2>/dev/null || true
      log "stopped $name"
    fi
  done
  for dev in ovs-netdev $bridges; do
    if ip -d link show dev "$dev" 2>/dev/null | grep -q ' tun '; then ip link delete "$dev" || true; fi
  done
  : > "$started"
}

status() {
  libvirt_ok && echo "libvirtd: running" || echo "libvirtd: stopped"
  ovs_ok && echo "openvswitch: running" || echo "openvswitch: stopped"
  tgt_ok && echo "tgtd: running" || echo "tgtd: stopped"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
