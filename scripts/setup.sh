#!/usr/bin/env bash
# Installs everything wiremesh needs on a Debian machine, as root, idempotently:
# apt packages (iproute2, wireguard-tools, wireguard-go, tcpdump, ...), Consul 1.8.7 from
# Debian 11 "bullseye" (unpacked from its .deb, never started as a service), and a Python
# virtual environment in .venv with wiremesh installed in editable mode plus test tools.
# Progress goes to stderr; a second run only checks and returns quickly.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${WIREMESH_VENV:-$here/.venv}
py=${PYTHON:-python3}
log() { printf 'setup: %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "must run as root (it installs apt packages)"; exit 1; }

apt_pkgs=(python3 python3-venv iproute2 wireguard-tools wireguard-go tcpdump iputils-ping procps psmisc util-linux mount kmod ca-certificates iperf3)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# Consul: DESIGN.md pins 1.8.7, packaged in bullseye main. A consul already on PATH is used.
if ! command -v consul >/dev/null 2>&1; then
    log "installing consul 1.8.7 from Debian bullseye"
    src=/etc/apt/sources.list.d/debian.sources
    uri=""
    [ -f "$src" ] && uri=$(awk '/^URIs:/{print $2; exit}' "$src")
    [ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    cat > /etc/apt/sources.list.d/wiremesh-bullseye.sources <<S
Types: deb
URIs: $uri
Suites: bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
S
    # Low priority: nothing else is ever upgraded from bullseye.
    cat > /etc/apt/preferences.d/wiremesh-bullseye <<P
Package: *
Pin: release n=bullseye
Pin-Priority: 100
P
    apt-get update -q >&2
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -q consul >&2)
    dpkg-deb -x "$tmp"/consul_*.deb "$tmp/x"
    install -m 0755 "$tmp/x/usr/bin/consul" /usr/local/bin/consul
    rm -rf "$tmp"
fi
log "consul: $(consul version | head -1)"

"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    log "$py is $("$py" --version 2>&1); wiremesh needs Python 3.11 or newer (set PYTHON=...)"; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
    log "creating virtual environment $venv"
    "$py" -m venv "$venv"
fi
stamp="$venv/.wiremesh-installed"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
    log "installing wiremesh and its dependencies into $venv"
    "$venv/bin/pip" install -q --upgrade pip >&2
    "$venv/bin/pip" install -q -e "$here[test]" >&2
    touch "$stamp"
fi
# Container runtimes look for CNI plugins in /opt/cni/bin; the plugin's "type" is its file name.
mkdir -p /opt/cni/bin
ln -sfn "$venv/bin/wiremesh-cni" /opt/cni/bin/wiremesh-cni
log "ready: $venv/bin/wiremesh (CNI plugin: /opt/cni/bin/wiremesh-cni)"
