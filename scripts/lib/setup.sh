# Shared by scripts/run and scripts/test: install what a fresh machine lacks.
# Sourced, not run. Everything here is idempotent and quick when already done.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages listed in scripts/apt-packages (comments after '#').
install_apt_packages() {
    local wanted=() missing=()
    mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$ROOT/scripts/apt-packages" | grep -v '^$' | awk '{print $1}')
    for p in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    # Debian's etcd-server package starts an etcd on 2379 by default; we run our own.
    if systemctl is-active --quiet etcd 2>/dev/null; then as_root systemctl disable --now etcd >/dev/null 2>&1 || true; fi
}

ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo is not installed; install a Rust toolchain (rustup) first"
}

# A Python virtual environment with the OpenStack CLI and the placement plugin.
ensure_openstack_cli() {
    if [ ! -x "$VENV/bin/openstack" ] || ! "$VENV/bin/python" -c 'import osc_placement' 2>/dev/null; then
        log "installing python-openstackclient and osc-placement into $VENV"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check python-openstackclient osc-placement
    fi
}

# A free TCP port on the loopback interface.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Waits until an HTTP URL answers (any status), up to $2 seconds.
wait_http() {
    local url=$1 secs=${2:-30} i
    for ((i = 0; i < secs * 10; i++)); do
        curl -s -o /dev/null "$url" && return 0
        sleep 0.1
    done
    return 1
}
