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
# swaks (an SMTP client), iproute2, Python's venv support when the system Python lacks it,
# redis-server (the shared shaping backend's tests start private instances of it), nsd, unbound
# and ldnsutils (the DANE tests sign a zone with ldns-signzone, serve it with a private nsd and
# resolve it through a private validating unbound: testkit/dnssec.py), and two real MTAs for
# the end-to-end tests (Postfix, and Exim unpacked beside it: see install_exim_for_tests).
install_system_packages() {
    local wanted=(haproxy dnsmasq-base swaks iproute2 ca-certificates postfix redis-server
        nsd unbound ldnsutils)
    local missing=()
    for package in "${wanted[@]}"; do
        is_installed "$package" || missing+=("$package")
    done
    if ! command -v python3 >/dev/null; then
        missing+=(python3 python3-venv)
    elif ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        missing+=(python3-venv)
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "==> apt-get install ${missing[*]}"
        apt_update_once
        # Postfix without a system configuration: its system instance never starts, and the
        # tests run private instances (postfix -c DIR) of their own.
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
        case " ${missing[*]} " in *" postfix "*) stop_system_postfix ;; esac
        case " ${missing[*]} " in *" redis-server "*) stop_system_redis ;; esac
        case " ${missing[*]} " in *" nsd "*) stop_system_service nsd ;; esac
        case " ${missing[*]} " in *" unbound "*) stop_system_service unbound ;; esac
    fi
    install_exim_for_tests
    install_opensmtpd_for_tests
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
        echo "error: Python >= 3.11 is required, found $(python3 --version)" >&2
        exit 1
    }
}

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"
}

APT_UPDATED=""
apt_update_once() {
    if [ -z "$APT_UPDATED" ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
}

# The package's system instance must not run (nor listen on port 25) on a test machine.
stop_system_postfix() {
    if [ -d /run/systemd/system ]; then
        systemctl disable --now postfix.service >/dev/null 2>&1 || true
    fi
    if postfix status >/dev/null 2>&1; then
        postfix stop >/dev/null 2>&1 || true
    fi
}

# Nor Redis's (it would listen on 127.0.0.1:6379): the tests run their own redis-server on
# test addresses, and a sidecar with backend = "redis" names the Redis it uses.
stop_system_redis() {
    if [ -d /run/systemd/system ]; then
        systemctl disable --now redis-server.service >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/redis-server ]; then
        /etc/init.d/redis-server stop >/dev/null 2>&1 || true
        update-rc.d redis-server disable >/dev/null 2>&1 || true
    fi
}

# Nor nsd's and unbound's (they would take port 53): the DANE tests run private instances on
# test addresses, and a production sidecar's validating resolver is the operator's choice.
stop_system_service() {
    local service=$1
    if [ -d /run/systemd/system ]; then
        systemctl disable --now "$service.service" >/dev/null 2>&1 || true
    elif [ -x "/etc/init.d/$service" ]; then
        "/etc/init.d/$service" stop >/dev/null 2>&1 || true
        update-rc.d "$service" disable >/dev/null 2>&1 || true
    fi
}

# Exim for the end-to-end tests. Debian's exim4-daemon-light conflicts with postfix (each is
# "the" MTA), so its binary is unpacked into EXIM_TEST_DIR instead of installed: the tests run
# it with their own configuration (exim -C FILE, with exim_path pointing here). What it needs
# from the system: the shared libraries it links (its Depends, installed with apt) and the
# Debian-exim user, whose name is compiled in.
EXIM_TEST_DIR=/opt/sidecar-test/exim4
install_exim_for_tests() {
    local binary="$EXIM_TEST_DIR/usr/sbin/exim4"
    if ! getent passwd Debian-exim >/dev/null; then
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin Debian-exim
    fi
    # -C /dev/null: an empty configuration, enough for -bV (there is no system one).
    if [ -x "$binary" ] && "$binary" -C /dev/null -bV >/dev/null 2>&1; then
        return 0
    fi
    echo "==> unpacking exim4-daemon-light into $EXIM_TEST_DIR"
    apt_update_once
    local work deb depends
    work=$(mktemp -d)
    chmod 755 "$work"
    getent passwd _apt >/dev/null && chown _apt "$work"   # apt's download sandbox user
    (cd "$work" && apt-get download -qq exim4-daemon-light >/dev/null)
    deb=$(ls "$work"/exim4-daemon-light_*.deb)
    # Its run-time libraries: the first alternative of each dependency, without versions,
    # and without exim4-base and debconf (the packaging, which would pull in an exim4 daemon
    # package and so remove postfix).
    depends=$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed -e 's/|.*//' -e 's/(.*)//' \
        -e 's/[[:space:]]//g' | grep -v -e '^$' -e '^exim4' -e '^debconf')
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $depends >/dev/null
    rm -rf "$EXIM_TEST_DIR.new"
    mkdir -p "$EXIM_TEST_DIR.new"
    dpkg-deb -x "$deb" "$EXIM_TEST_DIR.new"
    rm -rf "$EXIM_TEST_DIR" "$work"
    mv "$EXIM_TEST_DIR.new" "$EXIM_TEST_DIR"
    "$binary" -C /dev/null -bV 2>/dev/null | grep '^Exim version'
}

# OpenSMTPD for the end-to-end tests, unpacked like Exim (the opensmtpd package conflicts with
# postfix): its users, its libraries (already those of postfix and exim here), and smtpctl
# setgid opensmtpq (it refuses to run otherwise). Its spool and control socket are compiled in
# (/var/spool/smtpd, /var/run/smtpd.sock): one instance per machine.
OPENSMTPD_TEST_DIR=/opt/sidecar-test/opensmtpd
install_opensmtpd_for_tests() {
    local name
    for name in opensmtpd opensmtpq; do
        getent group "$name" >/dev/null || groupadd --system "$name"
        getent passwd "$name" >/dev/null || useradd --system --gid "$name" --no-create-home \
            --home-dir /var/lib/opensmtpd/empty --shell /usr/sbin/nologin "$name"
    done
    mkdir -p /var/lib/opensmtpd/empty
    if [ -x "$OPENSMTPD_TEST_DIR/usr/sbin/smtpd" ]; then
        return 0
    fi
    echo "==> unpacking opensmtpd into $OPENSMTPD_TEST_DIR"
    apt_update_once
    local work
    work=$(mktemp -d)
    chmod 755 "$work"
    getent passwd _apt >/dev/null && chown _apt "$work"
    (cd "$work" && apt-get download -qq opensmtpd >/dev/null)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        libevent-2.1-7 libdb5.3 libssl3 >/dev/null
    rm -rf "$OPENSMTPD_TEST_DIR"
    mkdir -p "$OPENSMTPD_TEST_DIR"
    dpkg-deb -x "$work"/opensmtpd_*.deb "$OPENSMTPD_TEST_DIR"
    rm -rf "$work"
    chgrp opensmtpq "$OPENSMTPD_TEST_DIR/usr/sbin/smtpctl"
    chmod 2755 "$OPENSMTPD_TEST_DIR/usr/sbin/smtpctl"
}

# The project's own virtual environment in .venv, with the sidecar installed editable and every
# dependency at the version constraints.txt pins (scripts/update-constraints.sh re-pins them).
# pip runs only when pyproject.toml or constraints.txt changed since the last install with
# these extras (a stamp in .venv records their hash), so a second demo or test run starts at
# once.
make_venv() {
    local extras="${1:-}"
    if [ ! -x .venv/bin/python ]; then
        echo "==> python3 -m venv .venv"
        python3 -m venv .venv
    fi
    local want
    want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
    installed() { [ "$(cat ".venv/.installed$1" 2>/dev/null)" = "$want" ]; }
    # An install with [test] holds everything a plain one needs.
    if { installed "$extras" || { [ -z "$extras" ] && installed "[test]"; }; } &&
        .venv/bin/python -c 'import sidecar' 2>/dev/null; then
        return 0
    fi
    # The distribution was called "sidecar" before (a name PyPI gives another project).
    if .venv/bin/pip show -q sidecar >/dev/null 2>&1; then
        .venv/bin/pip uninstall -q -y sidecar
    fi
    echo "==> pip install -c constraints.txt -e .${extras}"
    .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".${extras}"
    echo "$want" > ".venv/.installed${extras}"
}
