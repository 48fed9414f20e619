#!/usr/bin/env bash
# From a fresh Debian machine (as root) to a running loopback demo, in one command:
#   MTA (swaks) -> sidecar 127.0.0.1:2525 -> HAProxy 127.0.0.4:5000 (PROXY v2, usesrc clientip)
#   -> demo MX 127.0.0.2:10025, which prints the source address it saw: 127.0.0.5, the
#   binding's ha_proxy_src_addr, although nothing on this host was told to use that address.
# Runs until Ctrl-C; with DEMO_ONCE=1 it stops after the first message.
# Its addresses are .1 to .5 of DEMO_NET (default 127.0.0; the test suite keeps .1-.9 of each
# of its 127.N.0 blocks for fixed uses like this one), its files go to DEMO_DIR (demo-run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_root
install_system_packages
make_venv ""

DIR=${DEMO_DIR:-demo-run}
NET=${DEMO_NET:-127.0.0}
LISTENER=$NET.1 MX=$NET.2 DNS=$NET.3 HAPROXY=$NET.4 SOURCE=$NET.5
rm -rf "$DIR" && mkdir -p "$DIR"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

wait_for_port() {  # host port what
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "error: $3 did not start; see $DIR/*.log" >&2
    exit 1
}

cat > "$DIR/haproxy.cfg" <<CFG
# The egress HAProxy: see examples/haproxy.cfg for the commented production version.
global
    maxconn 1000
defaults
    mode tcp
    timeout connect 2s
    timeout client 11m
    timeout server 11m
    retries 1
frontend egress
    bind $HAPROXY:5000 accept-proxy
    default_backend mx
backend mx
    source 0.0.0.0 usesrc clientip
    server mx 0.0.0.0:0
CFG

cat > "$DIR/sidecar.toml" <<CFG
[server]
hostname = "sidecar.demo.test"

[[listener]]
address = "$LISTENER:2525"
binding = "demo"

[dns]
nameservers = ["$DNS:5353"]

[delivery]
port = 10025
allow_private_destinations = true   # the demo MX lives on loopback
tls = "disabled"
state_dir = "$DIR/state"            # the MTA-STS policy cache, with the demo's other files

[binding.demo]
ha_proxy_server = "$HAPROXY:5000"
ha_proxy_src_addr = "$SOURCE"
CFG

echo "==> dnsmasq: demo.test MX -> mx.demo.test ($MX)"
dnsmasq --no-daemon --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
    --listen-address="$DNS" --port=5353 --local=/demo.test/ \
    --mx-host=demo.test,mx.demo.test,10 --host-record=mx.demo.test,"$MX" \
    >"$DIR/dnsmasq.log" 2>&1 &
pids+=($!)
echo "==> demo MX on $MX:10025"
.venv/bin/python scripts/demo_mx.py "$MX" 10025 >"$DIR/mx.log" 2>&1 &
pids+=($!)
echo "==> HAProxy on $HAPROXY:5000"
haproxy -db -f "$DIR/haproxy.cfg" >"$DIR/haproxy.log" 2>&1 &
pids+=($!)
.venv/bin/sidecar check -c "$DIR/sidecar.toml" >/dev/null
echo "==> sidecar on $LISTENER:2525"
.venv/bin/sidecar run -c "$DIR/sidecar.toml" >"$DIR/sidecar.log" 2>&1 &
pids+=($!)
wait_for_port "$MX" 10025 "demo MX"
wait_for_port "$HAPROXY" 5000 HAProxy
wait_for_port "$LISTENER" 2525 sidecar

echo "==> sending a message with swaks"
swaks --server "$LISTENER:2525" --from demo@example.net --to someone@demo.test \
    --header "Subject: sidecar demo" --body "Hello through the sidecar." | tail -n 6
for _ in $(seq 50); do grep -q "demo MX:" "$DIR/mx.log" && break; sleep 0.1; done
echo
echo "==> what the MX saw:"
cat "$DIR/mx.log"
if grep -q "source address $SOURCE" "$DIR/mx.log"; then
    echo "==> OK: the MX saw the binding's source address $SOURCE"
else
    echo "error: the MX did not see $SOURCE; logs are in $DIR/" >&2
    exit 1
fi
if [ "${DEMO_ONCE:-0}" = 1 ]; then exit 0; fi
echo
echo "The demo is running. Try:  swaks --server $LISTENER:2525 --to you@demo.test"
echo "Logs: $DIR/*.log. Ctrl-C stops everything."
wait
