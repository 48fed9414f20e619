#!/usr/bin/env bash
# Build and run the sidecar's container with a real engine, Podman (the default) or Docker
# (`--engine docker`, or CHECK_ENGINE=docker), from a fresh Debian 12 machine, as root: the
# image, the README's `docker run` recipe against a real stack on loopback, the health check,
# a stop during a slow transaction, a reload, ports below 1024, the state directory,
# examples/compose and examples/kubernetes. Prints PASS/FAIL per check and exits 1 if any
# failed. README: "The container".
#
# No container registry is needed. The base images are stand-ins built here with debootstrap
# from Debian's apt mirror: "debian:bookworm-slim" is a minbase bookworm, and
# "python:3.11-slim-bookworm" is that plus Debian's python3 (3.11.2), python3-venv, python3-pip,
# netbase, tzdata and ca-certificates, with `python` and `pip` on PATH and no PEP 668
# EXTERNALLY-MANAGED marker (pip installs into /usr/local, as in the official image). They are
# NOT the official images (which carry python.org's CPython 3.11.x under /usr/local). The sidecar's Dockerfile is built
# unchanged, with --build-arg PYTHON_IMAGE=<the stand-in>; with registry access, the Dockerfile's
# default base (python:3.11-slim-bookworm) is used by a plain `docker build`. For the Compose
# example (whose Dockerfiles say FROM python:3.11-slim-bookworm and debian:bookworm-slim), the
# stand-ins are tagged with those names for the run, only if no image by that name is present,
# and untagged afterwards.
#
# Not part of scripts/test.sh nor CI: it downloads a Debian root file system (about 100 MB) and
# the sidecar's dependencies from PyPI, and takes a few minutes.
#
# With Docker: Debian's docker.io (Docker Engine 20.10) and docker-compose (1.29) are installed
# if missing, and if no Docker daemon answers, dockerd is started here (log in CHECK_DIR) and
# stopped at the end (it leaves its docker0 bridge and iptables chains, as dockerd does
# anywhere; docker.io stays installed). Docker runs the HEALTHCHECK itself (its own timers):
# the main container keeps the image's 30 s interval; the others are run with
# --health-interval 1s so that the healthy/unhealthy checks do not wait minutes.
# examples/compose runs with docker-compose; examples/kubernetes needs `podman kube play` and
# is skipped. Podman without systemd cannot time the health checks: there `podman healthcheck
# run` runs the same probe on demand.
#
# Idempotent: every container, pod, volume, network and image it makes is named
# sidecar-check-* (or is a tag it added) and removed at the end, as are the HAProxy and the
# test MX it starts; the debootstrapped root file systems stay in CHECK_DIR as a cache
# (CHECK_FRESH=1 rebuilds them). CHECK_KEEP=1 keeps the images and containers for a look.
# Addresses: .1 to .6 of CHECK_NET (default 127.25.0), ports 25, 2525, 5000, 9925, 10025.
set -uo pipefail
ENGINE=${CHECK_ENGINE:-podman}
while [ $# -gt 0 ]; do
    case $1 in
        --engine) ENGINE=${2:-}; shift 2 || shift ;;
        --engine=*) ENGINE=${1#--engine=}; shift ;;
        *) echo "usage: $0 [--engine podman|docker]" >&2; exit 2 ;;
    esac
done
case $ENGINE in
    podman | docker) ;;
    *) echo "error: --engine podman or --engine docker, not '$ENGINE'" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
. scripts/lib.sh
need_root

NET=${CHECK_NET:-127.25.0}
WORK=${CHECK_DIR:-/var/tmp/sidecar-container-check}
PREFIX=sidecar-check
DEB_BASE=localhost/$PREFIX/debian:bookworm-slim-standin
PY_BASE=localhost/$PREFIX/python:3.11-slim-bookworm-standin
IMAGE=localhost/$PREFIX/sidecar:latest
LISTENER=$NET.1 MX=$NET.2 HAPROXY=$NET.4 SOURCE=$NET.5
RUN=$WORK/run
# Podman's default OCI image format has no HEALTHCHECK: build everything in Docker's format
# (podman build and podman-compose's builds read this).
export BUILDAH_FORMAT=docker

failures=0
pass() { echo "PASS  $*"; }
fail() { echo "FAIL  $*"; failures=$((failures + 1)); }
check() {  # check "description" command...: PASS when the command succeeds
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
note() { echo "      $*"; }
quiet() { "$@" >/dev/null 2>&1; }
step() { echo; echo "==> $*"; }

# --- packages -------------------------------------------------------------------------------
if [ "$ENGINE" = docker ]; then
    step "packages: docker.io, docker-compose, runc, debootstrap, HAProxy, swaks, python3"
    wanted=(docker.io docker-compose runc debootstrap haproxy swaks python3 ca-certificates)
else
    step "packages: podman, buildah, podman-compose, runc, debootstrap, HAProxy, swaks, python3"
    wanted=(podman buildah podman-compose runc debootstrap haproxy swaks python3 ca-certificates)
fi
missing=()
for package in "${wanted[@]}"; do is_installed "$package" || missing+=("$package"); done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null || { echo "error: apt-get install ${missing[*]}" >&3; exit 1; }
fi
"$ENGINE" --version

mkdir -p "$WORK"
rm -rf "$RUN" && mkdir -p "$RUN"
chmod 755 "$WORK" "$RUN"
# stdout: the PASS/FAIL lines and notes; Podman's and the tools' stderr go to a log (fd 3 is
# the terminal's stderr, for this script's own errors).
exec 3>&2 2>>"$RUN/stderr.log"

# --- the engine's helpers --------------------------------------------------------------------
image_exists() {  # IMAGE
    if [ "$ENGINE" = docker ]; then
        docker image inspect "$1" >/dev/null 2>&1
    else
        podman image exists "$1"
    fi
}
untag() {  # NAME: remove this name only (the image stays under its other names)
    if [ "$ENGINE" = docker ]; then
        docker rmi "$1" >/dev/null 2>&1
    else
        podman untag "$1" >/dev/null 2>&1
    fi
}
health_status() { "$ENGINE" inspect "$1" --format '{{.State.Health.Status}}' 2>/dev/null; }
wait_for_health() {  # CONTAINER STATUS SECONDS: Docker runs the HEALTHCHECK on its own timers
    local _
    for _ in $(seq "$3"); do
        [ "$(health_status "$1")" = "$2" ] && return 0
        sleep 1
    done
    return 1
}
# healthy CONTAINER: the image's HEALTHCHECK passes. Podman (no systemd here to time it): run
# it now (`podman healthcheck run`). Docker: wait until Docker's own probes say "healthy" (a
# container with the image's 30 s interval: the first probe runs 30 s after the start).
healthy() {
    if [ "$ENGINE" = docker ]; then wait_for_health "$1" healthy 75; else podman healthcheck run "$1"; fi
}
unhealthy() {  # CONTAINER: the HEALTHCHECK fails (Docker: three failed probes in a row)
    if [ "$ENGINE" = docker ]; then wait_for_health "$1" unhealthy 60; else ! podman healthcheck run "$1" >/dev/null; fi
}
DOCKERD_PID=
# Docker: if no daemon answers, start Debian's dockerd here (no systemd needed; cgroupfs) and
# stop it at the end; its log is $WORK/dockerd.log.
start_dockerd() {
    local _
    docker info >/dev/null 2>&1 && return 0
    (setsid dockerd --exec-opt native.cgroupdriver=cgroupfs >"$WORK/dockerd.log" 2>&1 &
        echo $! >"$WORK/dockerd.pid")
    DOCKERD_PID=$(cat "$WORK/dockerd.pid")
    for _ in $(seq 150); do
        docker info >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}
stop_dockerd() {
    local _
    [ -n "$DOCKERD_PID" ] || return 0
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 150); do
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.2
    done
    rm -f "$WORK/dockerd.pid"
    DOCKERD_PID=
}

# --- clean-up: everything named $PREFIX-*, the tags we added, the processes we started -------
pids=()
added_tags=()
remove_all() {
    local name
    if [ "$ENGINE" = podman ]; then
        podman kube down "$REPO/examples/kubernetes/sidecar.yaml" >/dev/null 2>&1
        # What `podman kube play` made and `kube down` leaves: its ConfigMaps' volumes, its
        # network (recorded only when they did not exist before).
        for name in $(cat "$WORK/kube-made" 2>/dev/null); do
            podman volume exists "$name" && podman volume rm -f "$name" >/dev/null 2>&1
            podman network exists "$name" && podman network rm -f "$name" >/dev/null 2>&1
        done
        rm -f "$WORK/kube-made"
    fi
    if [ -f "$RUN/compose-project" ]; then
        (cd "$REPO/examples/compose" && "${COMPOSE:-podman-compose}" \
            -p "$(cat "$RUN/compose-project")" down -v >/dev/null 2>&1)
    fi
    for name in $("$ENGINE" ps -a --format '{{.Names}}' | grep "^$PREFIX-"); do
        "$ENGINE" rm -f -v "$name" >/dev/null 2>&1
    done
    for name in $("$ENGINE" volume ls --format '{{.Name}}' | grep "^$PREFIX-"); do
        "$ENGINE" volume rm -f "$name" >/dev/null 2>&1
    done
}
cleanup() {
    local tag
    [ "${#pids[@]}" -gt 0 ] && kill "${pids[@]}" 2>/dev/null
    wait 2>/dev/null
    if [ "${CHECK_KEEP:-0}" = 1 ]; then
        echo "CHECK_KEEP=1: containers and images kept ($ENGINE ps -a; $ENGINE images)"
        return
    fi
    remove_all
    for tag in "${added_tags[@]}"; do untag "$tag"; done
    # Podman names Compose's images localhost/PROJECT_SERVICE, docker-compose PROJECT_SERVICE.
    for tag in $("$ENGINE" images --format '{{.Repository}}:{{.Tag}}' | grep -E "^(localhost/)?${PREFIX}[/_-]"); do
        "$ENGINE" rmi -f "$tag" >/dev/null 2>&1
    done
    "$ENGINE" image prune -f >/dev/null 2>&1
    stop_dockerd
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ "$ENGINE" = docker ]; then
    start_dockerd || { echo "error: dockerd does not start; see $WORK/dockerd.log" >&3; exit 1; }
    docker version --format 'Docker Engine {{.Server.Version}} (API {{.Server.APIVersion}}), client {{.Client.Version}}'
fi
remove_all  # what an interrupted earlier run left

# --- the stand-in base images ----------------------------------------------------------------
step "stand-in base images (debootstrap bookworm minbase from deb.debian.org; not the official images)"
if [ "${CHECK_FRESH:-0}" = 1 ]; then rm -rf "$WORK/rootfs-debian" "$WORK/rootfs-python"; fi
if [ ! -f "$WORK/rootfs-debian/.complete" ]; then
    rm -rf "$WORK/rootfs-debian"
    debootstrap --variant=minbase bookworm "$WORK/rootfs-debian" http://deb.debian.org/debian \
        >"$WORK/debootstrap.log" 2>&1 || { echo "error: debootstrap; see $WORK/debootstrap.log" >&3; exit 1; }
    # A TLS-intercepting proxy's CA, if this host trusts one (else nothing): pip in the build
    # must reach PyPI through it.
    mkdir -p "$WORK/rootfs-debian/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$WORK/rootfs-debian/usr/local/share/ca-certificates/" 2>/dev/null
    chroot "$WORK/rootfs-debian" apt-get clean   # debootstrap leaves its .debs in the cache
    touch "$WORK/rootfs-debian/.complete"
fi
if [ ! -f "$WORK/rootfs-python/.complete" ]; then
    rm -rf "$WORK/rootfs-python"
    cp -a "$WORK/rootfs-debian" "$WORK/rootfs-python"
    rm "$WORK/rootfs-python/.complete"
    chroot "$WORK/rootfs-python" sh -c 'apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            python3 python3-venv python3-pip netbase tzdata ca-certificates &&
        update-ca-certificates >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/* &&
        rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED &&
        ln -sf /usr/bin/python3 /usr/local/bin/python && ln -sf /usr/bin/pip3 /usr/local/bin/pip' >"$WORK/chroot.log" 2>&1 ||
        { echo "error: python3 in the stand-in; see $WORK/chroot.log" >&3; exit 1; }
    touch "$WORK/rootfs-python/.complete"
fi
import_rootfs() {  # DIR IMAGE
    tar -C "$1" --exclude=./.complete -c . | "$ENGINE" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$2" >"$RUN/import.log" 2>&1
}
check "stand-in $DEB_BASE imported" import_rootfs "$WORK/rootfs-debian" "$DEB_BASE"
check "stand-in $PY_BASE imported" import_rootfs "$WORK/rootfs-python" "$PY_BASE"
note "stand-in Python: $(chroot "$WORK/rootfs-python" python --version 2>&1) (Debian's; the official image has python.org's)"

# Some hosts (containers in containers, CI sandboxes) cannot run Podman's defaults: a
# RLIMIT_NOFILE/NPROC above the host's hard limit, crun on a hybrid cgroup hierarchy, timers
# through systemd. Then use runc, cgroupfs, the host's limits and a file event log: the same
# images and containers, another way to start them.
if [ "$ENGINE" = podman ] && ! podman run --rm "$DEB_BASE" true >/dev/null 2>"$RUN/probe.err"; then
    cat >"$WORK/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    export CONTAINERS_CONF=$WORK/containers.conf
    note "podman's defaults fail here ($(tail -n 1 "$RUN/probe.err")): using $CONTAINERS_CONF"
fi
check "$ENGINE runs a container" "$ENGINE" run --rm "$DEB_BASE" true
# Without systemd, Podman cannot start the health check's timer (it logs an error at every
# start); `podman healthcheck run` works either way and is what the checks below use. Docker
# times the probes itself: the containers other than the README's run probe every second, so
# that "healthy" and "unhealthy" (three failures) are seen in seconds, not minutes.
HEALTH=()
if [ "$ENGINE" = docker ]; then
    HEALTH=(--health-interval 1s)
elif [ ! -d /run/systemd/system ]; then
    HEALTH=(--health-interval disable)
fi
# The README's `docker run`: the image's own health timers with Docker.
MAIN_HEALTH=("${HEALTH[@]}")
[ "$ENGINE" = docker ] && MAIN_HEALTH=()

# --- the image ---------------------------------------------------------------------------------
step "$ENGINE build (the Dockerfile unchanged, PYTHON_IMAGE=$PY_BASE)"
if "$ENGINE" build --build-arg PYTHON_IMAGE="$PY_BASE" -t "$IMAGE" . >"$RUN/build.log" 2>&1; then
    pass "image built: $IMAGE"
else
    fail "image built (see $RUN/build.log)"
    tail -n 20 "$RUN/build.log"
    exit 1
fi
check "the build prints no warning" bash -c "! grep -i warn '$RUN/build.log'"
inspect() { "$ENGINE" image inspect "$IMAGE" --format "$1"; }
note "size: $("$ENGINE" image ls "$IMAGE" --format '{{.Size}}') (base $("$ENGINE" image ls "$PY_BASE" --format '{{.Size}}'))"
"$ENGINE" history "$IMAGE" --format '{{.Size}}	{{.CreatedBy}}' | cut -c1-110 | sed 's/^/      /'
check "runs as 2525:2525" test "$(inspect '{{.Config.User}}')" = 2525:2525
check "HEALTHCHECK kept in the image" bash -c "$ENGINE image inspect '$IMAGE' --format '{{json .Config.Healthcheck}}' | grep -q healthcheck.py"
check "VOLUME /var/lib/sidecar" bash -c "$ENGINE image inspect '$IMAGE' --format '{{json .Config.Volumes}}' | grep -q /var/lib/sidecar"
in_image() { "$ENGINE" run --rm "${HEALTH[@]}" --entrypoint sh "$IMAGE" -c "$1" 2>>"$RUN/engine.log"; }
check "no source tree (/src) in the image" test "$(in_image 'ls -d /src 2>/dev/null')" = ""
check "no egg-info under /opt/sidecar" test "$(in_image 'find /opt/sidecar -name "*.egg-info"')" = ""
check "no pip nor setuptools in the venv" test "$(in_image 'ls /opt/sidecar/bin/pip* /opt/sidecar/lib/python3*/site-packages | grep -iE "^(pip|setuptools)"')" = ""
check "id is uid=2525(sidecar) gid=2525(sidecar)" bash -c "[[ '$(in_image id)' == 'uid=2525(sidecar) gid=2525(sidecar)'* ]]"
check "/var/lib/sidecar owned by 2525:2525" test "$(in_image 'stat -c %u:%g /var/lib/sidecar')" = 2525:2525
note "$(in_image 'sidecar --version')"

# --- the stack on loopback: a test MX and the egress HAProxy ------------------------------------
step "test MX on $MX:10025 and HAProxy on $HAPROXY:5000 (accept-proxy, usesrc clientip)"
cat >"$RUN/mx.py" <<'PY'
"""A test MX (stdlib only): prints each message with the source address of its connection;
a recipient whose local part starts with "slow" gets its end-of-data reply DELAY s late."""
import socketserver
import sys
import time

DELAY = float(sys.argv[3])


class Handler(socketserver.StreamRequestHandler):
    def send(self, line):
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self):
        peer, envelope = self.client_address[0], []
        self.send("220 mx.check.test ESMTP test MX")
        while line := self.rfile.readline():
            line = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = line[:4].upper()
            if verb == "EHLO":
                self.send("250-mx.check.test\r\n250 PIPELINING")
            elif verb in ("MAIL", "RCPT"):
                envelope.append(line)
                self.send("250 OK")
            elif verb == "DATA":
                self.send("354 go ahead")
                size = 0
                while (data := self.rfile.readline()) not in (b".\r\n", b""):
                    size += len(data)
                print(f"test MX: message from source address {peer}: {'; '.join(envelope)}; "
                      f"{size} bytes", flush=True)
                if any("<slow" in item.lower() for item in envelope):
                    time.sleep(DELAY)
                envelope.clear()
                self.send(f"250 2.0.0 queued; test MX saw your connection from {peer}")
            elif verb == "QUIT":
                self.send("221 bye")
                return
            else:
                self.send("250 OK")


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


Server((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
PY
cat >"$RUN/haproxy.cfg" <<CFG
global
    maxconn 100
defaults
    mode tcp
    timeout connect 2s
    timeout client 11m
    timeout server 11m
frontend egress
    bind $HAPROXY:5000 accept-proxy
    default_backend mx
backend mx
    source 0.0.0.0 usesrc clientip
    server mx 0.0.0.0:0
CFG
python3 -u "$RUN/mx.py" "$MX" 10025 20 >"$RUN/mx.log" 2>&1 &
pids+=($!)
haproxy -db -f "$RUN/haproxy.cfg" >"$RUN/haproxy.log" 2>&1 &
pids+=($!)

wait_for_port() {  # host port [tries of 0.2 s]
    local _
    for _ in $(seq "${3:-100}"); do
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
        sleep 0.2
    done
    return 1
}
wait_for_log() {  # container pattern [seconds]
    local _
    for _ in $(seq $((${3:-20} * 5))); do
        "$ENGINE" logs "$1" 2>&1 | grep -q -- "$2" && return 0
        sleep 0.2
    done
    return 1
}
check "test MX answers" wait_for_port "$MX" 10025
check "HAProxy answers" wait_for_port "$HAPROXY" 5000

# The configuration directory, as the README says: readable by gid 2525.
CONF=$RUN/conf
mkdir -p "$CONF"
write_config() {  # FILE LISTENER [status]
    cat >"$1" <<CFG
# scripts/container-check.sh
[server]
hostname = "sidecar.check.test"
shutdown_grace = 30

[[listener]]
address = "$2"
binding = "b1"

[dns.static]
"check.test" = ["$MX"]

[delivery]
port = 10025
allow_private_destinations = true   # the test MX is on loopback
tls = "disabled"

[binding.b1]
ha_proxy_server = "$HAPROXY:5000"
ha_proxy_src_addr = "$SOURCE"
CFG
    if [ "${3:-}" = status ]; then printf '\n[status]\naddress = "%s:9925"\n' "$LISTENER" >>"$1"; fi
    chgrp 2525 "$1" && chmod 640 "$1"
}
write_config "$CONF/sidecar.toml" "$LISTENER:2525" status
chmod 755 "$CONF"

# --- the README's commands -------------------------------------------------------------------
step "sidecar init and sidecar check in the container"
"$ENGINE" run --rm "${HEALTH[@]}" "$IMAGE" sidecar init - >"$RUN/init.toml" 2>>"$RUN/engine.log"
check "sidecar init - writes a starter to stdout" grep -q '^\[server\]' "$RUN/init.toml"
"$ENGINE" run --rm "${HEALTH[@]}" "$IMAGE" sidecar init >"$RUN/init-cwd.out" 2>&1
grep -v 'level=error' "$RUN/init-cwd.out" | sed 's/^/      /'
check "sidecar init (read-only cwd) fails and says: write to stdout" grep -q "sidecar init -" "$RUN/init-cwd.out"
check "sidecar check with the directory mounted" quiet "$ENGINE" run --rm "${HEALTH[@]}" \
    -v "$CONF:/etc/sidecar:ro" "$IMAGE" sidecar check

step "docker run's equivalent: --network host, the config directory read-only, a state volume"
SIDECAR=$PREFIX-run
"$ENGINE" run -d --name "$SIDECAR" "${MAIN_HEALTH[@]}" --network host --stop-timeout 45 \
    -v "$CONF:/etc/sidecar:ro" -v "$PREFIX-state:/var/lib/sidecar" "$IMAGE" >/dev/null 2>>"$RUN/engine.log"
check "the sidecar listens on $LISTENER:2525" wait_for_port "$LISTENER" 2525
swaks --server "$LISTENER:2525" --from check@example.net --to someone@check.test \
    --header "Subject: container check" >"$RUN/swaks.log" 2>&1
check "swaks: 250 from the MX through the container" grep -q '^<-  250 2.0.0 queued' "$RUN/swaks.log"
check "the MX saw the binding's source address $SOURCE" \
    grep -q "source address $SOURCE: MAIL FROM:<check@example.net>" "$RUN/mx.log"
check "health check: healthy (SIDECAR_CONFIG)" healthy "$SIDECAR"
check "health status 'healthy'" test "$("$ENGINE" inspect "$SIDECAR" --format '{{.State.Health.Status}}')" = healthy
check "the state directory is writable by the sidecar" \
    "$ENGINE" exec "$SIDECAR" sh -c 'touch /var/lib/sidecar/.check && rm /var/lib/sidecar/.check'
note "sidecar RSS after one message: $("$ENGINE" exec "$SIDECAR" grep VmRSS /proc/1/status | tr -s ' \t' ' ')"

step "SIGHUP after an edit on the host (directory mount)"
sed -i 's/^shutdown_grace = 30/shutdown_grace = 31/' "$CONF/sidecar.toml"   # a new inode
"$ENGINE" kill -s HUP "$SIDECAR" >/dev/null
check "edited file: 'configuration reloaded'" wait_for_log "$SIDECAR" "configuration reloaded" 10
check "edited file: not 'configuration unchanged'" bash -c "! $ENGINE logs '$SIDECAR' 2>&1 | grep -q 'configuration unchanged'"
"$ENGINE" kill -s HUP "$SIDECAR" >/dev/null
check "unchanged file: 'configuration unchanged'" wait_for_log "$SIDECAR" "configuration unchanged" 10
sed -i 's/^shutdown_grace = 31/shutdown_grace = 30/' "$CONF/sidecar.toml"

step "$ENGINE stop (the container has --stop-timeout 45) during a slow transaction (the MX answers end of data 20 s late)"
swaks --server "$LISTENER:2525" --from check@example.net --to slow@check.test \
    >"$RUN/swaks-slow.log" 2>&1 &
slow=$!
for _ in $(seq 100); do grep -q "slow@check.test" "$RUN/mx.log" && break; sleep 0.2; done
started=$(date +%s)
"$ENGINE" stop "$SIDECAR" >/dev/null   # no -t: the --stop-timeout 45 given to $ENGINE run
wait "$slow"
note "$ENGINE stop took $(($(date +%s) - started)) s"
check "exit status 0 (not killed)" test "$("$ENGINE" inspect "$SIDECAR" --format '{{.State.ExitCode}}')" = 0
check "the slow transaction got the MX's 250" grep -q '^<-  250 2.0.0 queued' "$RUN/swaks-slow.log"
check "the log says SIGTERM, then the transaction" bash -c \
    "$ENGINE logs '$SIDECAR' 2>&1 | sed -n '/received SIGTERM/,\$p' | grep -q 'transaction session='"
"$ENGINE" rm -v "$SIDECAR" >/dev/null

step "sidecar run -c /config/x.toml: the health check finds the running configuration"
mkdir -p "$RUN/config"
chmod 755 "$RUN/config"
write_config "$RUN/config/x.toml" "$LISTENER:2525" status
"$ENGINE" run -d --name "$PREFIX-c" "${HEALTH[@]}" --network host -v "$RUN/config:/config:ro" \
    "$IMAGE" sidecar run -c /config/x.toml >/dev/null 2>>"$RUN/engine.log"
check "the sidecar listens" wait_for_port "$LISTENER" 2525
check "health check: healthy (-c /config/x.toml, no file at SIDECAR_CONFIG)" \
    healthy "$PREFIX-c"
"$ENGINE" rm -f -v "$PREFIX-c" >/dev/null
"$ENGINE" run -d --name "$PREFIX-init" "${HEALTH[@]}" --init --network host \
    -v "$RUN/config:/config:ro" "$IMAGE" sidecar run --config=/config/x.toml >/dev/null 2>>"$RUN/engine.log"
check "the sidecar listens ($ENGINE run --init)" wait_for_port "$LISTENER" 2525
check "health check: healthy (--init, --config=FILE)" healthy "$PREFIX-init"
"$ENGINE" rm -f -v "$PREFIX-init" >/dev/null
"$ENGINE" run -d --name "$PREFIX-none" "${HEALTH[@]}" --network host "$IMAGE" sleep 600 >/dev/null 2>>"$RUN/engine.log"
check "health check: unhealthy when no sidecar runs" unhealthy "$PREFIX-none"
"$ENGINE" rm -f -v "$PREFIX-none" >/dev/null

step "--read-only root file system (Kubernetes' readOnlyRootFilesystem), state volume"
"$ENGINE" run -d --name "$PREFIX-ro" "${HEALTH[@]}" --read-only --network host \
    -v "$CONF:/etc/sidecar:ro" -v "$PREFIX-state:/var/lib/sidecar" "$IMAGE" >/dev/null 2>>"$RUN/engine.log"
check "the sidecar listens with a read-only root" wait_for_port "$LISTENER" 2525
check "healthy with a read-only root" healthy "$PREFIX-ro"
check "the state directory is writable with a read-only root" \
    "$ENGINE" exec "$PREFIX-ro" sh -c 'touch /var/lib/sidecar/.check && rm /var/lib/sidecar/.check'
"$ENGINE" rm -f -v "$PREFIX-ro" >/dev/null

step "a single-file bind mount: an edit on the host is not seen, and the sidecar says so"
mkdir -p "$RUN/single"
chmod 755 "$RUN/single"
write_config "$RUN/single/sidecar.toml" "$LISTENER:2525"
"$ENGINE" run -d --name "$PREFIX-file" "${HEALTH[@]}" --network host \
    -v "$RUN/single/sidecar.toml:/etc/sidecar/sidecar.toml:ro" "$IMAGE" >/dev/null 2>>"$RUN/engine.log"
wait_for_port "$LISTENER" 2525
sed -i 's/^shutdown_grace = 30/shutdown_grace = 31/' "$RUN/single/sidecar.toml"
"$ENGINE" kill -s HUP "$PREFIX-file" >/dev/null
check "single file, edited: 'configuration unchanged ... mount its directory'" \
    wait_for_log "$PREFIX-file" "mount its directory" 10
"$ENGINE" rm -f -v "$PREFIX-file" >/dev/null

# --- ports below 1024 ------------------------------------------------------------------------
step "a listener on port 25 as uid 2525"
mkdir -p "$RUN/port25"
chmod 755 "$RUN/port25"
write_config "$RUN/port25/host.toml" "$LISTENER:25"
write_config "$RUN/port25/own.toml" "0.0.0.0:25"
listens() {  # config run-options...: does `sidecar run` get its listener up?
    local config=$1
    shift
    local output
    output=$("$ENGINE" run --rm "${HEALTH[@]}" -v "$RUN/port25:/etc/sidecar:ro" "$@" "$IMAGE" \
        sh -c "timeout 3 sidecar run -c /etc/sidecar/$config.toml 2>&1" 2>>"$RUN/engine.log")
    echo "$output" >>"$RUN/port25.log"
    grep -q "listening on" <<<"$output"
}
refused() { ! listens "$@"; }
note "host's net.ipv4.ip_unprivileged_port_start: $(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)"
if [ "$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)" -gt 25 ]; then
    check "--network host, no capability: refused" refused host --network host
fi
if [ "$ENGINE" = docker ]; then
    # Docker adds the capability to the bounding set only: a non-root process does not get it
    # (moby/moby#8460); in the container's own network namespace Docker 20.10+ sets
    # ip_unprivileged_port_start to 0.
    if [ "$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)" -gt 25 ]; then
        check "--network host --cap-add NET_BIND_SERVICE: refused (Docker: not in the ambient set)" \
            refused host --network host --cap-add NET_BIND_SERVICE
    fi
    check "own network namespace, no option: listens (Docker sets ip_unprivileged_port_start=0)" \
        listens own
else
    check "--network host --cap-add NET_BIND_SERVICE: listens (Podman: added caps are ambient)" \
        listens host --network host --cap-add NET_BIND_SERVICE
fi
check "own network namespace, --sysctl net.ipv4.ip_unprivileged_port_start=25: listens" \
    listens own --sysctl net.ipv4.ip_unprivileged_port_start=25

kill "${pids[@]}" 2>/dev/null
wait 2>/dev/null
pids=()

# --- Compose ---------------------------------------------------------------------------------
step "examples/compose with $([ "$ENGINE" = docker ] && echo docker-compose || echo podman-compose) (the stand-ins tagged as the official names)"
tag_as() {  # IMAGE NAME: tag only when NAME is not present (a real image wins)
    if ! image_exists "$2"; then
        "$ENGINE" tag "$1" "$2" && added_tags+=("$2")
    fi
}
tag_as "$PY_BASE" docker.io/library/python:3.11-slim-bookworm
tag_as "$DEB_BASE" docker.io/library/debian:bookworm-slim
if [ "$ENGINE" = docker ]; then
    # Debian 12's docker-compose 1.29 (Python); Compose v2 (`docker compose`) is not in Debian 12.
    COMPOSE=docker-compose
    note "compose: $(docker-compose version --short 2>/dev/null) (docker-compose)"
else
    # Debian 12's podman-compose (1.0.3) knows neither a service's networks.NAME.ipv4_address
    # (KeyError) nor stop_grace_period (it stops with -t 10): then take a newer one from PyPI
    # into a venv here (pip, pinned).
    COMPOSE=podman-compose
    if ! grep -q ipv4_address "$(python3 -c 'import podman_compose; print(podman_compose.__file__)' 2>/dev/null || echo /dev/null)"; then
        if [ ! -x "$WORK/venv-compose/bin/podman-compose" ]; then
            python3 -m venv "$WORK/venv-compose" &&
                "$WORK/venv-compose/bin/pip" install -q podman-compose==1.6.0 >>"$RUN/pip.log" 2>&1
        fi
        COMPOSE=$WORK/venv-compose/bin/podman-compose
    fi
    note "compose: $("$COMPOSE" version 2>/dev/null | grep -i podman-compose | head -n 1)"
fi
PROJECT=$PREFIX-compose
echo "$PROJECT" >"$RUN/compose-project"
(cd examples/compose && "$COMPOSE" -p "$PROJECT" up -d --build) >"$RUN/compose.log" 2>&1
if grep -q "$PROJECT" <("$ENGINE" ps --format '{{.Names}}'); then
    pass "$(basename "$COMPOSE") up --build"
    mx_container=$("$ENGINE" ps -a --format '{{.Names}}' | grep -E "^${PROJECT}[_-]mx[_-]")
    sidecar_container=$("$ENGINE" ps -a --format '{{.Names}}' | grep -E "^${PROJECT}[_-]sidecar[_-]")
    for _ in $(seq 120); do
        [ "$("$ENGINE" logs "$mx_container" 2>&1 | grep -c 'source address 172.28.0.5')" -ge 2 ] && break
        sleep 1
    done
    "$ENGINE" logs "$mx_container" 2>&1 | sed 's/^/      mx | /'
    check "compose: the MX got both demo messages from 172.28.0.5" \
        test "$("$ENGINE" logs "$mx_container" 2>&1 | grep -c 'source address 172.28.0.5')" -ge 2
    postfix_container=$("$ENGINE" ps -a --format '{{.Names}}' | grep -E "^${PROJECT}[_-]postfix[_-]")
    check "compose: Postfix logged status=sent for both recipients" \
        test "$("$ENGINE" logs "$postfix_container" 2>&1 | grep -c 'relay=127.0.0.1.*status=sent')" = 2
    check "compose: no warning from Postfix" bash -c "! $ENGINE logs '$postfix_container' 2>&1 | grep -E 'warning|fatal'"
    haproxy_container=$("$ENGINE" ps -a --format '{{.Names}}' | grep -E "^${PROJECT}[_-]haproxy[_-]")
    # HAProxy logs a connection when it ends: the sidecar's connection cache closes it when idle.
    wait_for_log "$haproxy_container" '172.28.0.5 -> 172.28.0.25:25' 60
    check "compose: HAProxy logs the relayed connection, not the health checks" bash -c \
        "$ENGINE logs '$haproxy_container' 2>&1 | grep -q '172.28.0.5 -> 172.28.0.25:25' &&
         ! $ENGINE logs '$haproxy_container' 2>&1 | grep -q 'waiting for PROXY protocol header'"
    check "compose: the sidecar is healthy" healthy "$sidecar_container"
    check "compose: the sidecar's state volume is writable" \
        "$ENGINE" exec "$sidecar_container" sh -c 'touch /var/lib/sidecar/.check && rm /var/lib/sidecar/.check'
    started=$(date +%s)
    (cd examples/compose && "$COMPOSE" -p "$PROJECT" stop sidecar) >>"$RUN/compose.log" 2>&1
    note "compose stop sidecar took $(($(date +%s) - started)) s"
    check "compose: the sidecar stopped with exit status 0" \
        test "$("$ENGINE" inspect "$sidecar_container" --format '{{.State.ExitCode}}')" = 0
else
    fail "$(basename "$COMPOSE") up --build (the other Compose checks skipped; see $RUN/compose.log)"
    tail -n 5 "$RUN/compose.log" | sed 's/^/      /'
fi
(cd examples/compose && "$COMPOSE" -p "$PROJECT" down -v) >>"$RUN/compose.log" 2>&1
rm -f "$RUN/compose-project"

# --- Kubernetes ------------------------------------------------------------------------------
if [ "$ENGINE" = docker ]; then
    step "examples/kubernetes: skipped (it needs podman kube play or a cluster; run with --engine podman)"
else
    step "examples/kubernetes with podman kube play (images tagged as the manifest names them)"
    postfix_image=$("$ENGINE" images --format '{{.Repository}}:{{.Tag}}' | grep -E "${PROJECT}[_-]postfix" | head -n 1)
    for name in $(grep -o 'image: [^ ]*' examples/kubernetes/sidecar.yaml | cut -d' ' -f2); do
        case $name in
            *postfix*) [ -n "$postfix_image" ] && tag_as "$postfix_image" "$name" ;;
            *) tag_as "$IMAGE" "$name" ;;
        esac
    done
    before=$("$ENGINE" volume ls --format '{{.Name}}'; "$ENGINE" network ls --format '{{.Name}}')
    podman kube play examples/kubernetes/sidecar.yaml >"$RUN/kube.log" 2>&1
    { "$ENGINE" volume ls --format '{{.Name}}'; "$ENGINE" network ls --format '{{.Name}}'; } |
        grep -vxF -f <(echo "$before") >"$WORK/kube-made"
    check "podman kube play" grep -q "^Pod:" "$RUN/kube.log"
    pod=$(podman pod ps --format '{{.Name}}' | grep '^mta' | head -n 1)
    kube_sidecar=$("$ENGINE" ps --format '{{.Names}}' | grep "^${pod}-sidecar" | head -n 1)
    check "kube: the sidecar container runs as 2525" \
        test "$("$ENGINE" exec "$kube_sidecar" id -u 2>/dev/null)" = 2525
    kube_probe() {
        "$ENGINE" exec "$kube_sidecar" python -c 'import urllib.request as u, sys
try:
    r = u.urlopen("http://127.0.0.1:9925/healthz", timeout=5)
except Exception as e:
    r = e
print(getattr(r, "status", r))' 2>&1
    }
    for _ in $(seq 50); do kube_probe | grep -qE '^[0-9]+$' && break; sleep 0.2; done
    note "kube: /healthz answers $(kube_probe) (the manifest's HAProxy 10.0.0.5:5000 is not here)"
    check "kube: /healthz answers on the pod's status port" bash -c "[[ '$(kube_probe)' =~ ^[0-9]+$ ]]"
    kube_postfix=$("$ENGINE" ps --format '{{.Names}}' | grep "^${pod}-postfix" | head -n 1)
    postfix_runs() {
        local _
        for _ in $(seq 30); do
            "$ENGINE" exec "$kube_postfix" postfix status >/dev/null 2>&1 && return 0
            sleep 1
        done
        return 1
    }
    check "kube: Postfix runs" postfix_runs
    check "kube: Postfix reaches the sidecar at 127.0.0.1:2525 (one network namespace)" \
        "$ENGINE" exec "$kube_postfix" nc -z 127.0.0.1 2525
    check "kube: Postfix's settings are the ConfigMap's" bash -c \
        "$ENGINE exec '$kube_postfix' postconf -h relayhost default_transport | tr '\n' ' ' | grep -qx '\[127.0.0.1\]:2525 sidecar '"
    check "kube: the root file system is read-only" \
        bash -c "! $ENGINE exec '$kube_sidecar' touch /opt/x 2>/dev/null"
    check "kube: the state directory (emptyDir) is writable" \
        "$ENGINE" exec "$kube_sidecar" sh -c 'touch /var/lib/sidecar/.check && rm /var/lib/sidecar/.check'
    podman kube down examples/kubernetes/sidecar.yaml >>"$RUN/kube.log" 2>&1
fi

echo
if [ "$failures" = 0 ]; then
    echo "container-check: all checks passed (logs: $RUN)"
else
    echo "container-check: $failures check(s) FAILED (logs: $RUN)"
    exit 1
fi
