# Shared by scripts/demo.sh and scripts/test.sh: install what the sidecar, its demo and its tests
# need on a Debian machine, as root. Safe to run again: it installs only what is missing.

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "error: run as root: apt-get installs packages, and HAProxy's" \
             "'usesrc clientip' needs root (CAP_NET_ADMIN) to use another source address" >&2
        exit 1
    fi
}

# Debian packages: HAProxy (the egress), dnsmasq (a real DNS server for tests and the demo),
# swaks (an SMTP client), iproute2, and Python's venv support when the system Python lacks it.
install_system_packages() {
    local wanted=(haproxy dnsmasq-base swaks iproute2 ca-certificates)
    local missing=()
    for package in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$package")
    done
    if ! command -v python3 >/dev/null; then
        missing+=(python3 python3-venv)
    elif ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        missing+=(python3-venv)
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "==> apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
        echo "error: Python >= 3.11 is required, found $(python3 --version)" >&2
        exit 1
    }
}

# The project's own virtual environment in .venv, with the sidecar installed editable.
make_venv() {
    local extras="${1:-}"
    if [ ! -x .venv/bin/python ]; then
        echo "==> python3 -m venv .venv"
        python3 -m venv .venv
    fi
    echo "==> pip install -e .${extras}"
    .venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"
}
