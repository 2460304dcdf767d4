#!/usr/bin/env bash
# The quickstart's external host: a network namespace on the node's br-ex
# (the provider bridge of the external network, examples/quickstart/
# 15-external.yaml) holding 203.0.113.1, the external subnet's gateway,
# standing in for the upstream router. It runs a tiny HTTP service on 8080
# that answers with the source address it saw, to show SNAT from inside.
#
#   hack/upstream.sh up      (after the agent made br-ex)
#   hack/upstream.sh fetch URL   (an HTTP GET from the external host)
#   hack/upstream.sh down
set -euo pipefail
netns=nubes-upstream
veth=nb-upstream   # host side, a port of br-ex
address=203.0.113.1/24
bridge=br-ex
root=$(cd "$(dirname "$0")/.." && pwd)
state=${NUBES_STATE:-$root/.nubes}
pidfile=$state/run/upstream-http.pid

SERVER='
import http.server, sys
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"you came from {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("0.0.0.0", 8080), Echo).serve_forever()
'

up() {
  for _ in $(seq 120); do ovs-vsctl --timeout=3 br-exists "$bridge" && break; sleep 0.5; done
  ovs-vsctl --timeout=3 br-exists "$bridge" || { echo "upstream: no $bridge (is the agent's bridge mapping external:$bridge set?)" >&2; exit 1; }
  ip netns list | grep -qx "$netns" || ip netns add "$netns"
  if ! ip link show "$veth" >/dev/null 2>&1; then
    ip link add "$veth" type veth peer name eth0 netns "$netns"
  fi
  ip link set "$veth" up
  ovs-vsctl --timeout=3 --may-exist add-port "$bridge" "$veth"
  ip -n "$netns" addr replace "$address" dev eth0
  ip -n "$netns" link set eth0 up
  ip -n "$netns" link set lo up
  # The userspace datapath does not complete partial checksums (host-facts).
  ip netns exec "$netns" ethtool -K eth0 tx off >/dev/null
  if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then return; fi
  mkdir -p "$(dirname "$pidfile")"
  nohup ip netns exec "$netns" "$root/.venv/bin/python" -c "$SERVER" >/dev/null 2>&1 &
  echo $! >"$pidfile"
}

down() {
  if [[ -f $pidfile ]]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  fi
  ip netns pids "$netns" 2>/dev/null | xargs -r kill 2>/dev/null || true
  timeout 5 ovs-vsctl --timeout=3 --if-exists del-port "$veth" 2>/dev/null || true
  ip link del "$veth" 2>/dev/null || true
  ip netns del "$netns" 2>/dev/null || true
}

case ${1:-} in
  up) up ;;
  down) down ;;
  fetch) ip netns exec "$netns" curl -fsS -m 3 "$2" ;;
  *) echo "usage: $0 up|down|fetch URL" >&2; exit 2 ;;
esac
