#!/usr/bin/env bash
# Federation on VMs, tested from the host: the Vagrant lab's clusters connected with the setup
# wizard's non-interactive path (answers generated from the topology), each node's agent as a
# systemd service, then checks printed as a table; exits 1 if any check failed.
#
#   vagrant/test-federation.sh [--up] [--destroy] [--kernel-only [-- PYTEST_ARGS...]]
#     --up       install the host's packages (scripts/vagrant-setup.sh), build the box if it is
#                missing (vagrant/box/build.sh), start libvirt in its network namespace
#                (vagrant/netns.sh) and `vagrant up` the lab first
#     --destroy  afterwards, whatever happened (a failed check, a failed `vagrant up`, Ctrl-C):
#                `vagrant destroy`, remove libvirt's domains, networks and volumes, stop the
#                daemons netns.sh started, delete the namespace; then list what is left
#                (`netns.sh check`) and whether the host's root namespace gained an address
#     --kernel-only  one VM only (the first node): the project's kernel-backend integration
#                test in it, or the pytest arguments given after `--` (vagrant/test-kernel-backend.sh)
#
# The project as it is in this checkout is copied into every VM (/opt/wiremesh, over the box's
# copy) before the checks, so they test this checkout's code, not the box's.
# Checks: Consul servers WAN-joined; setup applied; each agent active with the kernel WireGuard
# backend (a "wireguard" link, the agent's "kernel backend" log line); a pod in every cluster
# pings a pod in every other cluster over the overlay; TCP between pods (iperf3); a capture on
# the VMs' network shows only WireGuard UDP (and Consul's own ports) between the VMs, never a
# pod address; a Consul server restart while pods ping each other loses (almost) nothing; every
# VM has its own machine id; the project's kernel-backend integration test
# (tests/integration/test_kernel_backend.py), which skips on a host without the module, passes
# inside the first node VM.
# Environment: WIREMESH_TOPOLOGY (default lab/topologies/vagrant-mini.yaml), WIREMESH_NETNS
# (wmvag), WIREMESH_LOCK (default /tmp/wiremesh-integ.lock: held for the whole run, box build
# included; "" = none; a lock the caller holds already, `flock LOCK test-federation.sh`, is used).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
export WIREMESH_TOPOLOGY=${WIREMESH_TOPOLOGY:-$repo/lab/topologies/vagrant-mini.yaml}
export VAGRANT_DEFAULT_PROVIDER=${VAGRANT_DEFAULT_PROVIDER:-libvirt}
lock=${WIREMESH_LOCK-/tmp/wiremesh-integ.lock}
up=0 destroy=0 kernel_only=0
pytest_args=(tests/integration/test_kernel_backend.py)
while [ $# -gt 0 ]; do
    a=$1; shift
    case $a in
        --up) up=1 ;;
        --destroy) destroy=1 ;;
        --kernel-only) kernel_only=1 ;;
        --) [ $# -eq 0 ] || pytest_args=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "test-federation.sh: unknown argument $a" >&2; exit 2 ;;
    esac
done
cd "$here"
say() { printf '[%4ds] %s\n' "$SECONDS" "$*" >&2; }
inns() { "$here/netns.sh" exec "$@"; }
py=$repo/.venv/bin/python; [ -x "$py" ] || py=python3
[ "$(id -u)" -eq 0 ] || { say "must run as root (libvirt, network namespaces)"; exit 1; }
mkdir -p "$here/.vagrant"

# The host's root network namespace: its addresses now, and every address added during the run.
root_addrs() { ip -o addr show | awk '{print $2, $4}' | sort; }
addrs_before=$(root_addrs)
ip -o monitor address >"$here/.vagrant/root-ns-monitor.log" 2>&1 & monitor=$!

# shellcheck disable=SC2317  # called through the EXIT trap
teardown() {
    local rc=$? t0=$SECONDS
    trap - INT TERM HUP
    if [ "${printed:-1}" = 0 ]; then   # stopped before the end: what ran so far
        print_table
        printf 'STOPPED after %d s, exit status %d (a command failed, or a signal)\n' "$SECONDS" "$rc"
        [ "$rc" != 0 ] || rc=1
    fi
    if [ "$destroy" = 1 ]; then
        say "destroying the lab"
        inns vagrant destroy -f >/dev/null 2>&1 || true
        "$here/netns.sh" stop || true
        rm -rf "$here/.vagrant/machines"
        printf '\nclean up (%d s): ' "$((SECONDS - t0))"
        "$here/netns.sh" check || rc=1
    fi
    kill "$monitor" 2>/dev/null || true; wait "$monitor" 2>/dev/null || true
    added=$(grep -v '^Deleted' "$here/.vagrant/root-ns-monitor.log" || true)
    if [ -n "$added" ] || [ "$(root_addrs)" != "$addrs_before" ]; then
        printf 'root network namespace: CHANGED during the run\n%s\n' "$added"; rc=1
    else
        printf 'root network namespace: no address added during the run (ip monitor), addresses as before:\n'
        awk '{print "    " $0}' <<<"$addrs_before"
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# The shared lock, for the whole run: a lock this process inherited already (the caller ran
# `flock LOCK test-federation.sh`) is reused instead of waited for forever.
if [ -n "$lock" ]; then
    held=""
    real=$(realpath -m "$lock")
    for fd in "/proc/$$/fd/"*; do
        n=${fd##*/}
        [ "$(readlink "$fd" 2>/dev/null)" = "$real" ] && flock -n "$n" && { held=$n; break; }
    done
    if [ -z "$held" ]; then
        exec 9>>"$lock"
        say "waiting for $lock (held while VMs run and the box is built)"
        flock 9
    fi
fi
if [ "$up" = 1 ]; then
    bash "$repo/scripts/vagrant-setup.sh"
fi
# Machines, addresses and answers from the topology (the Vagrantfile's rules: machines.py).
shvars=$("$py" "$here/machines.py" "$WIREMESH_TOPOLOGY") || exit 1
eval "$shvars"
if [ "$kernel_only" = 1 ]; then   # the first node's VM alone
    VMS=("$(cut -d: -f2 <<<"${NODES[0]}")")
fi
if [ "$up" = 1 ]; then
    vagrant box list 2>/dev/null | grep -q '^wiremesh/bookworm ' || [ -n "${WIREMESH_BOX:-}" ] || "$here/box/build.sh"
    "$here/netns.sh" start
    say "vagrant up: ${VMS[*]} (${WIREMESH_TOPOLOGY#"$repo"/})"
    t0=$SECONDS
    if ! inns vagrant up "${VMS[@]}" 2>&1 | tr '\r' '\n' | grep -v -e 'Progress:' -e 'Connection refused. Retrying' >"$here/.vagrant/up.log"; then :; fi
    running=$(inns vagrant status 2>/dev/null | grep -c ' running ' || true)
    [ "$running" = "${#VMS[@]}" ] || { say "vagrant up failed ($running of ${#VMS[@]} VMs running): see vagrant/.vagrant/up.log"; tail -n 20 "$here/.vagrant/up.log" >&2; exit 1; }
    up_s=$((SECONDS - t0))
    say "vagrant up took $up_s s"
fi

inns vagrant ssh-config "${VMS[@]}" >"$here/.vagrant/ssh-config" 2>/dev/null || true
vs() { local m=$1; shift; inns ssh -F "$here/.vagrant/ssh-config" -o LogLevel=ERROR -o ConnectTimeout=10 "$m" "sudo bash -c $(printf '%q' "$*")"; }

# This checkout's project into every VM (the box holds the one it was built from). Its Python
# dependencies come from the box: a changed pyproject.toml needs a new box (build.sh --force).
if [ -z "${WIREMESH_BOX:-}" ] || [ "$WIREMESH_BOX" = wiremesh/bookworm ]; then
    files=""
    if [ -d "$repo/.git" ]; then   # tracked and new files, as they are in the work tree
        files=$(cd "$repo" && git ls-files --cached --others --exclude-standard | while read -r f; do [ -e "$f" ] && echo "$f"; done)
    fi
    t0=$SECONDS
    for m in "${VMS[@]}"; do
        boxdeps=$(vs "$m" "sha256sum </opt/wiremesh/pyproject.toml" 2>/dev/null | cut -d' ' -f1)
        if [ -n "$files" ]; then
            (cd "$repo" && printf '%s\n' "$files" | tar -cf - --no-recursion -T -)
        else
            tar -C "$repo" --exclude=./.venv --exclude=./.git --exclude='*/__pycache__' --exclude=./vagrant/box/build \
                --exclude=./vagrant/.vagrant --exclude=./tunnels/bpf/build -cf - .
        fi | vs "$m" "tar -C /opt/wiremesh -xf - && touch /opt/wiremesh/.venv/.wiremesh-installed" \
            || { say "copying the project into $m failed"; exit 1; }
        [ "$boxdeps" = "$(sha256sum <"$repo/pyproject.toml" | cut -d' ' -f1)" ] \
            || say "WARNING: $m's box was built from another pyproject.toml: rebuild it (vagrant/box/build.sh --force)"
    done
    say "this checkout's project copied into ${#VMS[@]} VMs ($((SECONDS - t0)) s)"
fi

# The project's kernel-backend integration test (it skips on a host without the module).
kernel_backend_check() {   # kernel_backend_check VM: pytest "${pytest_args[@]}" in the VM
    local m=$1 kb=$here/.vagrant/kernel-backend.log summary passed='[0-9]+'
    vs "$m" "cd /opt/wiremesh && timeout 600 .venv/bin/python -m pytest -p no:cacheprovider -rA $(printf '%q ' "${pytest_args[@]}")" >"$kb" 2>&1 || true
    summary=$(grep -E '^=+ .*(passed|failed|skipped|error).* =+$' "$kb" | tail -n1 | tr -d '=' | sed 's/^ *//;s/ *$//' || true)
    # The kernel-backend test file: both its tests must pass (none skipped: the module is there).
    [ "${pytest_args[*]}" != tests/integration/test_kernel_backend.py ] || passed=2
    check "$m: pytest ${pytest_args[*]}" \
        "$(grep -qE "(^| )$passed passed" <<<"$summary" && ! grep -qE 'skipped|failed|error' <<<"$summary" && echo 0 || echo 1)" \
        "${summary:-no result} (log: ${kb#"$repo"/})"
}


results=()
failed=0
printed=0
print_table() {
    printed=1
    [ ${#results[@]} -gt 0 ] || return 0
    printf '\n%-52s %-4s %s\n' CHECK RESULT DETAIL
    printf '%s\n' "${results[@]}"
    [ -z "${up_s:-}" ] || printf '(vagrant up: %d s; total: %d s)\n' "$up_s" "$SECONDS"
}
check() {   # check NAME OK(0/1) DETAIL
    local st=PASS
    [ "$2" = 0 ] || { st=FAIL; failed=1; }
    results+=("$(printf '%-52s %-4s %s' "$1" "$st" "$3")")
    say "$st $1 $3"
}

if [ "$kernel_only" = 1 ]; then
    kernel_backend_check "${VMS[0]}"
    print_table
    exit "$failed"
fi

# 1. Consul: every server sees all datacenters on the WAN.
first_server=${CLUSTERS[0]#*:}; first_server=${first_server%%:*}
first_addr=${CLUSTERS[0]##*:}
wan=$(vs "$first_server" "consul members -wan" 2>&1 | grep -c ' alive ' || true)
check "consul servers WAN-joined" "$([ "$wan" -ge "${#CLUSTERS[@]}" ] && echo 0 || echo 1)" "$wan/${#CLUSTERS[@]} alive"

# 2. Connect the clusters: the wizard's non-interactive path, answers from the topology. The
# first Consul server's VM is the operator's machine: each new cluster's signing key stays there.
signing=/root/wiremesh-signing
rc=0
out=$(printf '%s' "$ANSWERS" | vs "$first_server" "cat >/tmp/wiremesh-answers.json && wiremesh --consul http://$first_addr:8500 setup --answers /tmp/wiremesh-answers.json --yes --signing-keys $signing" 2>&1) || rc=$?
check "wiremesh setup --answers (from topology)" "$rc" "$(printf '%s' "$out" | grep -c . ) lines of output"
[ "$rc" = 0 ] || printf '%s\n' "$out" | tail -n 15 >&2

# 3. Every node enrolled (the clusters require signed records): its identity key is made on the
# node and never leaves it; the operator certifies its public half with the cluster's signing
# key (`wiremesh node enroll --identity-public`), and the certificate goes to the node's node.crt.
for n in "${NODES[@]}"; do
    IFS=: read -r cl m _ <<<"$n"
    caddr=""
    for c in "${CLUSTERS[@]}"; do [ "${c%%:*}" = "$cl" ] && caddr=${c##*:}; done
    pub=$(vs "$m" "install -d -m 0700 /var/lib/wiremesh && /opt/wiremesh/.venv/bin/python -c 'from pathlib import Path; from wiremesh.keys import load_or_generate_signing_key as g; print(g(Path(\"/var/lib/wiremesh/identity.key\"))[0].public_key().base64)'" 2>&1 || true)
    rc=0
    cert=$(vs "$first_server" "wiremesh --consul http://$caddr:8500 node enroll $m --cluster $cl --signing-key $signing/$cl.key --identity-public '$pub'" 2>"$here/.vagrant/enroll-$m.log") || rc=$?
    [ "$rc" != 0 ] || printf '%s\n' "$cert" | vs "$m" "install -m 0644 /dev/stdin /var/lib/wiremesh/node.crt" || rc=$?
    cidr=$(printf '%s' "$cert" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["pod_cidr"])' 2>/dev/null || echo "no certificate: $(tail -n1 "$here/.vagrant/enroll-$m.log") $pub")
    check "$m: enrolled (node enroll, signed records)" "$rc" "pod CIDR $cidr"
done

# 4. Agents (systemd) with the kernel backend; pods (a network namespace per node).
for n in "${NODES[@]}"; do
    IFS=: read -r _ m _ <<<"$n"
    vs "$m" "systemctl restart wiremesh-agent" || true
done
declare -A POD
for n in "${NODES[@]}"; do
    IFS=: read -r _ m _ <<<"$n"
    ok=1
    for _ in $(seq 60); do
        if vs "$m" "ip -o -4 addr show wm0 | grep -q inet && [ \$(wg show wm0 peers | wc -l) -ge $((${#NODES[@]} - 1)) ]" 2>/dev/null; then ok=0; break; fi
        sleep 2
    done
    kind=$(vs "$m" "ip -d -o link show wm0 2>/dev/null | grep -o -w wireguard; journalctl -u wiremesh-agent --no-pager | grep -o '([a-z]* backend)' | tail -n1" 2>/dev/null | tr '\n' ' ')
    active=$(vs "$m" "systemctl is-active wiremesh-agent" 2>/dev/null || true)
    check "$m: agent $active, peers programmed" "$ok" "$(vs "$m" "wg show wm0 peers | wc -l" 2>/dev/null) peers"
    case $kind in *wireguard*"(kernel backend)"*) k=0 ;; *) k=1 ;; esac
    check "$m: kernel WireGuard backend" "$k" "${kind% }"
    # A pod: its own network namespace behind a veth, the node's first pod address + 9.
    cidr=$(vs "$m" "ip -o -4 addr show wm0" | awk '{print $4}' | head -n1)
    base=${cidr%/*}; pod=${base%.*}.$(( ${base##*.} + 9 ))
    POD[$m]=$pod
    vs "$m" "ip netns del pod 2>/dev/null; ip netns add pod && ip link add hpod type veth peer name eth0 netns pod && \
        ip link set hpod mtu 1420 up && ip -n pod link set eth0 mtu 1420 up && ip -n pod link set lo up && \
        ip addr add ${base%.*}.254/32 dev hpod && ip route replace $pod/32 dev hpod && \
        ip -n pod addr add $pod/32 dev eth0 && ip -n pod route add ${base%.*}.254/32 dev eth0 && \
        ip -n pod route add default via ${base%.*}.254 && sysctl -qw net.ipv4.ip_forward=1" || true
done

# 5. The wire: everything between the VMs while pods talk, captured on the VMs' network.
a=${NODES[0]}; b=${NODES[${#NODES[@]}-1]}
ma=${a#*:}; ma=${ma%%:*}; mb=${b#*:}; mb=${mb%%:*}
bridges=$(for net in $(virsh -q -c qemu:///system net-list --name | grep '^wiremesh-' | grep -v mgmt); do
    virsh -c qemu:///system net-info "$net" | awk '/^Bridge:/ {print $2}'; done)
pcap=$here/.vagrant/wire.pcap
br1=$(echo "$bridges" | head -n1)
inns timeout 25 tcpdump -i "$br1" -nn -U -w "$pcap" not arp >/dev/null 2>&1 & cap=$!
sleep 2

pings=$(vs "$ma" "ip netns exec pod ping -c 5 -i 0.5 -W 2 ${POD[$mb]}" 2>&1 | grep -o '[0-9]* received' || echo "0 received")
check "pod $ma -> pod $mb: ping over the overlay" "$([ "${pings%% *}" -ge 4 ] && echo 0 || echo 1)" "$pings of 5 (${POD[$ma]} -> ${POD[$mb]})"
pings=$(vs "$mb" "ip netns exec pod ping -c 5 -i 0.5 -W 2 ${POD[$ma]}" 2>&1 | grep -o '[0-9]* received' || echo "0 received")
check "pod $mb -> pod $ma: ping over the overlay" "$([ "${pings%% *}" -ge 4 ] && echo 0 || echo 1)" "$pings of 5"
vs "$mb" "ip netns exec pod iperf3 -s -1 -D -B ${POD[$mb]}" >/dev/null 2>&1 || true
sleep 1
bps=$(vs "$ma" "ip netns exec pod timeout 20 iperf3 -c ${POD[$mb]} -t 3 -J" 2>/dev/null | "$py" -c 'import json,sys; print(int(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]))' 2>/dev/null || echo 0)
check "TCP pod -> pod (iperf3, 3 s)" "$([ "$bps" -gt 0 ] && echo 0 || echo 1)" "$((bps / 1000000)) Mbit/s"
sleep 1
kill "$cap" 2>/dev/null || true; wait "$cap" 2>/dev/null || true
wgport=51820
total=$(inns tcpdump -nn -r "$pcap" 2>/dev/null | wc -l)
wg=$(inns tcpdump -nn -r "$pcap" "udp port $wgport" 2>/dev/null | wc -l)
other=$(inns tcpdump -nn -r "$pcap" "not udp port $wgport and not (tcp portrange 8300-8302 or udp portrange 8301-8302 or tcp port 8500) and not ip6" 2>/dev/null | head -n 3)
clear=$(inns tcpdump -nn -r "$pcap" "net 10.240.0.0/12" 2>/dev/null | wc -l)
check "wire: only WireGuard UDP between the VMs" "$([ "$wg" -gt 0 ] && [ -z "$other" ] && [ "$clear" = 0 ] && echo 0 || echo 1)" \
    "$wg of $total packets WireGuard UDP/$wgport, rest Consul; pod addresses in clear: $clear${other:+; other: $other}"

# 6. A Consul server restart while pods ping each other.
vs "$ma" "ip netns exec pod ping -c 60 -i 0.25 -W 1 ${POD[$mb]} >/tmp/ping-restart.txt 2>&1 &" || true
sleep 2
srv=${CLUSTERS[0]#*:}; srv=${srv%%:*}
vs "$srv" "systemctl restart wiremesh-consul" || true
sleep 16
got=$(vs "$ma" "grep -o '[0-9]* received' /tmp/ping-restart.txt" 2>/dev/null || echo "0 received")
alive=$(for n in "${NODES[@]}"; do m=${n#*:}; m=${m%%:*}; vs "$m" "systemctl is-active wiremesh-agent" 2>/dev/null; done | grep -c '^active' || true)
after=$(vs "$ma" "ip netns exec pod ping -c 3 -i 0.5 -W 2 ${POD[$mb]}" 2>&1 | grep -o '[0-9]* received' || echo "0 received")
check "Consul server restart ($srv) under ping" "$([ "${got%% *}" -ge 55 ] && [ "$alive" = "${#NODES[@]}" ] && [ "${after%% *}" -ge 2 ] && echo 0 || echo 1)" \
    "$got of 60 during, agents active $alive/${#NODES[@]}, after: $after of 3"

# 7. Every VM its own machine id (the box ships an empty /etc/machine-id: made at first boot).
ids=()
for m in "${VMS[@]}"; do
    # (a machine id still on a tmpfs, "transient", was not written to the disk)
    ids+=("$(vs "$m" "cat /etc/machine-id; if findmnt -n /etc/machine-id >/dev/null; then echo transient; fi" 2>/dev/null | tr '\n' ' ' || true)")
done
distinct=$(printf '%s\n' "${ids[@]}" | grep -cE '^[0-9a-f]{32} $' || true)
uniq=$(printf '%s\n' "${ids[@]}" | sort -u | grep -c . || true)
check "every VM its own /etc/machine-id" "$([ "$distinct" = "${#VMS[@]}" ] && [ "$uniq" = "${#VMS[@]}" ] && echo 0 || echo 1)" \
    "$(for i in "${!VMS[@]}"; do printf '%s %.8s.. ' "${VMS[i]}" "${ids[i]}"; done)"

# 8. The project's kernel-backend integration test, in the first node's VM.
kernel_backend_check "$ma"

print_table
exit "$failed"
