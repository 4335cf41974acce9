#!/usr/bin/env bash
# Installs everything wiremesh needs on a Debian machine, as root, idempotently:
# apt packages (iproute2, wireguard-tools, wireguard-go, tcpdump, ...), Consul 1.8.7 from
# Debian 11 "bullseye" (unpacked from its .deb, never started as a service), and a Python
# virtual environment in .venv with wiremesh installed in editable mode plus test tools.
#
# Quiet by default: one line per step on stderr (what it installed, how long it took); the full
# output of apt, dpkg and pip goes to a log file, named in the first line printed. A step that
# fails prints "setup: FAILED: <step> (see LOG)" and the last lines of that step's output, and
# the script exits non-zero. A ready machine gets one line and nothing is logged.
#   bash scripts/setup.sh [-v|--verbose]
# Environment:
#   WIREMESH_SETUP_VERBOSE=1  same as -v: show everything (it still goes to the log too); this
#                             is how to get it through scripts/lab.sh and scripts/test.sh
#   WIREMESH_SETUP_LOG=FILE   the log (default /var/log/wiremesh-setup.log; each run appends)
#   WIREMESH_VENV=DIR         the virtual environment (default .venv in the repository)
#   PYTHON=python3.X          the Python that creates the virtual environment (3.11 or newer)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${WIREMESH_VENV:-$here/.venv}
py=${PYTHON:-python3}
logf=${WIREMESH_SETUP_LOG:-/var/log/wiremesh-setup.log}
case ${WIREMESH_SETUP_VERBOSE:-0} in 0|"") verbose=0 ;; *) verbose=1 ;; esac
script_args="$*"
for arg in "$@"; do
    case $arg in
        -v|--verbose) verbose=1 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) printf 'setup: unknown argument %s (usage: setup.sh [-v|--verbose])\n' "$arg" >&2; exit 2 ;;
    esac
done

t_start=$EPOCHREALTIME; t_start=${t_start//[!0-9]/}
exec 3>&2 4>&1           # fd 3: where the one-line summaries go; fd 4: the original stdout
working=0                # 1 once output is redirected to the log
step=""                  # the step under way, named in the failure message
step_off=0               # the log's size when that step began: its output starts there
tee_pid=""

say() {
    printf 'setup: %s\n' "$*" >&3
    if [ "$working" = 1 ]; then printf 'setup: %s\n' "$*" >>"$logf"; fi
}
now_us() { local t=$EPOCHREALTIME; printf '%s' "${t//[!0-9]/}"; }
took() {                 # "4.1 s" below 10 s, "38 s" from there on
    local d=$(( ($(now_us) - $1) / 100000 ))
    if [ "$d" -lt 100 ]; then printf '%d.%d s' $((d / 10)) $((d % 10)); else printf '%d s' $(((d + 5) / 10)); fi
}
# First real work: from here on every command's stdout and stderr goes to the log (and, with -v,
# to the terminal as well). Only the summaries written by say() reach the terminal otherwise.
start_work() {
    [ "$working" = 0 ] || return 0
    mkdir -p "$(dirname "$logf")"
    printf '\n===== %s: scripts/setup.sh%s\n' "$(date '+%F %T')" "${script_args:+ $script_args}" >>"$logf"
    if [ "$verbose" = 1 ]; then
        exec > >(tee -a "$logf" >&3) 2>&1
        tee_pid=$!
    else
        exec >>"$logf" 2>&1
    fi
    working=1
    say "installing; full output in $logf"
}
begin() {
    start_work
    step=$1
    step_off=$(stat -c %s "$logf")
    printf -- '----- %s\n' "$step" >>"$logf"
    step_t0=$(now_us)
}
finish() { say "$* ($(took "$step_t0"))"; step=""; }

on_exit() {
    local rc=$1
    if [ "$working" = 1 ]; then
        exec 1>&4 2>&3   # close the pipe to tee so it ends, and wait for its last lines
        if [ -n "$tee_pid" ]; then wait "$tee_pid" 2>/dev/null || true; fi
    fi
    [ "$rc" -ne 0 ] || return 0
    if [ "$working" = 1 ]; then
        # The last lines of the failed step's own output (with -v they are on the screen already).
        local out=""
        [ "$verbose" = 1 ] || out=$(tail -c +"$((step_off + 1))" "$logf" | tail -n 30 | sed 's/^/    /')
        say "FAILED: ${step:-setup} (see $logf)"
        if [ -n "$out" ]; then printf '%s\n' "$out" >&3; fi
    fi
}
trap 'on_exit $?' EXIT

[ "$(id -u)" -eq 0 ] || { say "must run as root (it installs apt packages)"; exit 1; }

# ---- What is there already (checks only; nothing printed, nothing logged) ----
apt_pkgs=(python3 python3-venv iproute2 wireguard-tools wireguard-go tcpdump iputils-ping procps psmisc util-linux mount kmod ca-certificates iperf3 clang llvm libbpf-dev bpftool iptables curl faketime)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
vshow=${venv#"$here"/}
stamp="$venv/.wiremesh-installed"
cni_link=/opt/cni/bin/wiremesh-cni

# ---- apt ----
if [ ${#missing[@]} -gt 0 ]; then
    begin "apt install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    finish "apt: installed ${missing[*]}"
fi

# ---- Consul: DESIGN.md pins 1.8.7, packaged in bullseye main. A consul already on PATH is used.
consul_version() {       # the consul on PATH, or the one just installed if PATH lacks /usr/local/bin
    "$(command -v consul || echo /usr/local/bin/consul)" version 2>/dev/null | sed -n '1{s/^Consul v//;p}'
}
if ! command -v consul >/dev/null 2>&1; then
    begin "consul 1.8.7 from Debian bullseye"
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
    apt-get update -q
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -q consul)
    dpkg-deb -x "$tmp"/consul_*.deb "$tmp/x"
    install -m 0755 "$tmp/x/usr/bin/consul" /usr/local/bin/consul
    rm -rf "$tmp"
    /usr/local/bin/consul version
    finish "consul $(consul_version) from Debian bullseye"
fi
consul_v=$(consul_version)

# ---- Python and the virtual environment ----
if ! command -v "$py" >/dev/null 2>&1; then
    begin "python check: $py"
    echo "$py: not found; wiremesh needs Python 3.11 or newer (set PYTHON=...)"
    exit 1
fi
if ! out=$("$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>&1); then
    begin "python check: $py"
    [ -z "$out" ] || printf '%s\n' "$out"
    echo "$py is $("$py" --version 2>&1 || true); wiremesh needs Python 3.11 or newer (set PYTHON=...)"
    exit 1
fi
if [ ! -x "$venv/bin/python" ] || [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
    created=""
    if [ ! -x "$venv/bin/python" ]; then
        begin "create virtual environment $venv"
        "$py" -m venv "$venv"
        created="created, "
    fi
    begin "pip install -e ${here}[test] into $venv"
    "$venv/bin/pip" install --upgrade pip
    "$venv/bin/pip" install -e "${here}[test]"
    touch "$stamp"
    # pip freeze leaves out pip itself and the editable wiremesh: what is left came for wiremesh.
    n=$("$venv/bin/pip" freeze --exclude-editable | grep -c . || true)
    finish "venv $vshow: ${created}wiremesh and $n packages"
fi

# The eBPF service load balancer is compiled here from its source (never a committed binary).
# (and the network policy datapath beside it)
bpf_obj=$here/tunnels/bpf/build/lb.bpf.o
pol_obj=$here/tunnels/bpf/build/policy.bpf.o
if [ ! -f "$bpf_obj" ] || [ "$here/tunnels/bpf/lb.bpf.c" -nt "$bpf_obj" ] ||
   [ ! -f "$pol_obj" ] || [ "$here/tunnels/bpf/policy.bpf.c" -nt "$pol_obj" ]; then
    begin "compile the eBPF service load balancer and network policy"
    "$venv/bin/python" -m wiremesh.tunnels.bpf build
    finish "eBPF: compiled ${bpf_obj#"$here"/} and ${pol_obj#"$here"/} (clang $(clang -dumpversion))"
fi

# Container runtimes look for CNI plugins in /opt/cni/bin; the plugin's "type" is its file name.
if [ "$(readlink "$cni_link" 2>/dev/null || true)" != "$venv/bin/wiremesh-cni" ]; then
    begin "link the CNI plugin into /opt/cni/bin"
    mkdir -p /opt/cni/bin
    ln -sfn "$venv/bin/wiremesh-cni" "$cni_link"
    say "CNI plugin: $cni_link -> $venv/bin/wiremesh-cni"
    step=""
fi

if [ "$working" = 1 ]; then
    say "done in $(took "$t_start"): $vshow/bin/wiremesh"
else
    say "ready (apt, consul $consul_v, $vshow up to date) — nothing to do"
fi
