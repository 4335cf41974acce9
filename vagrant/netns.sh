#!/usr/bin/env bash
# Keeps the Vagrant lab's networks off this machine's own network: libvirtd (and so its bridges,
# taps and dnsmasq) and vagrant run inside a network namespace made for them. Used by
# test-federation.sh on machines without systemd as PID 1 (the build machines); on a laptop
# with a running libvirtd plain `vagrant up` works instead.
#   netns.sh start            namespace $WIREMESH_NETNS (default wmvag), virtlogd and libvirtd in it
#   netns.sh exec CMD...      run CMD inside it (vagrant, virsh, tcpdump, ...)
#   netns.sh stop             remove every libvirt domain/network/volume of the lab (and a
#                             storage pool Vagrant defined), stop the daemons started by `start`
#                             (by pid) and what runs in the namespace, delete the namespace
#   netns.sh check            list what the lab left on this machine (exit 1 if anything)
set -euo pipefail
ns=${WIREMESH_NETNS:-wmvag}
run=/run/wiremesh-vagrant
say() { printf 'netns: %s\n' "$*" >&2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

case ${1:-} in
start)
    [ "$(id -u)" -eq 0 ] || { say "must run as root"; exit 1; }
    mkdir -p "$run"
    if ! ip netns list | grep -qw "$ns"; then
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    fi
    if alive "$run/libvirtd.pid"; then exit 0; fi
    if pgrep -x libvirtd >/dev/null; then
        say "a libvirtd not started by netns.sh is running: its networks would not be in $ns; stop it first"
        exit 1
    fi
    alive "$run/virtlogd.pid" || ip netns exec "$ns" virtlogd -d -p "$run/virtlogd.pid"
    ip netns exec "$ns" libvirtd -d -p "$run/libvirtd.pid"
    for _ in $(seq 50); do virsh -q -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
    virsh -q -c qemu:///system version >/dev/null || { say "libvirtd did not answer"; exit 1; }
    # Storage pools there before the lab: `stop` removes only those Vagrant defines (its "default").
    [ -f "$run/pools.before" ] || virsh -q -c qemu:///system pool-list --all --name | sed '/^$/d' >"$run/pools.before"
    say "namespace $ns: virtlogd $(cat "$run/virtlogd.pid"), libvirtd $(cat "$run/libvirtd.pid")"
    ;;
exec)
    shift
    exec ip netns exec "$ns" "$@"
    ;;
stop)
    v="virsh -q -c qemu:///system"
    if alive "$run/libvirtd.pid"; then
        for d in $($v list --all --name | grep '^vagrant_' || true); do
            $v destroy "$d" >/dev/null 2>&1 || true
            $v undefine "$d" --remove-all-storage --nvram >/dev/null 2>&1 || $v undefine "$d" --remove-all-storage >/dev/null 2>&1 || true
        done
        for n in $($v net-list --all --name | grep -E '^wiremesh-' || true); do
            $v net-destroy "$n" >/dev/null 2>&1 || true
            $v net-undefine "$n" >/dev/null 2>&1 || true
        done
        for vol in $($v vol-list default 2>/dev/null | awk 'NR>0 && /vagrant|wiremesh/ {print $1}' || true); do
            $v vol-delete --pool default "$vol" >/dev/null 2>&1 || true
        done
        if [ -f "$run/pools.before" ]; then
            for pool in $($v pool-list --all --name | sed '/^$/d'); do
                grep -qx "$pool" "$run/pools.before" && continue
                [ -z "$($v vol-list "$pool" 2>/dev/null | sed '/^$/d')" ] || continue   # not emptied: keep
                $v pool-destroy "$pool" >/dev/null 2>&1 || true
                $v pool-undefine "$pool" >/dev/null 2>&1 || true
            done
        fi
    fi
    rm -f "$run/pools.before"
    for p in libvirtd virtlogd; do
        if alive "$run/$p.pid"; then
            pid=$(cat "$run/$p.pid"); kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$run/$p.pid"
    done
    # dnsmasq of libvirt's networks (inside the namespace only)
    if ip netns list | grep -qw "$ns"; then
        for pid in $(ip netns pids "$ns"); do kill "$pid" 2>/dev/null || true; done
        sleep 0.5
        ip netns del "$ns"
    fi
    # libvirt leaves empty LIBVIRT_* chains behind; in the namespace they went with it, on the
    # host (a libvirtd once run outside a namespace) they are removed here if empty.
    for t in filter nat mangle; do
        for ch in $(iptables -t "$t" -S 2>/dev/null | awk '/^-N LIBVIRT_/ {print $2}'); do
            if [ "$(iptables -t "$t" -S "$ch" | wc -l)" -le 1 ] && ! iptables -t "$t" -S | grep -q -- "-j $ch\b"; then
                iptables -t "$t" -X "$ch" || true
            fi
        done
    done
    # libvirt keeps its networks' runtime files after net-destroy/net-undefine (dnsmasq's pid
    # files, naming pids now gone, and the networks' port directories): removed once no
    # libvirtd runs (a libvirtd not started here may own networks of the same names).
    if ! pgrep -x libvirtd >/dev/null; then
        rm -rf /run/libvirt/network/wiremesh-*
    fi
    say "stopped: no domain, network, volume, daemon or namespace of the lab left"
    ;;
check)
    # What a lab could leave behind, looked up without libvirtd (which `stop` ended).
    left=()
    ip netns list | grep -qw "$ns" && left+=("namespace $ns")
    for p in libvirtd virtlogd; do alive "$run/$p.pid" && left+=("$p (pid $(cat "$run/$p.pid"))"); done
    while read -r pid args; do
        [ -n "$pid" ] && left+=("process $pid: ${args:0:80}")
    done < <(pgrep -a -f '^(/usr/bin/)?qemu-system|libvirt/dnsmasq/wiremesh-|vagrant/qemu-tcg' || true)
    for f in /etc/libvirt/qemu/vagrant_*.xml /run/libvirt/qemu/vagrant_*.xml \
             /etc/libvirt/qemu/networks/wiremesh-*.xml /run/libvirt/network/wiremesh-* \
             /var/lib/libvirt/images/*vagrant* /var/lib/libvirt/images/*wiremesh*; do
        [ -e "$f" ] && left+=("$f")
    done
    for t in filter nat mangle raw; do
        for cmd in iptables ip6tables; do
            c=$($cmd -t "$t" -S 2>/dev/null | grep -c -e '^-N LIBVIRT_' || true)
            [ "$c" = 0 ] || left+=("$c LIBVIRT_* chains in $cmd -t $t")
        done
    done
    if [ ${#left[@]} -eq 0 ]; then echo "left behind: nothing"; exit 0; fi
    printf 'left behind: %s\n' "${left[@]}"; exit 1
    ;;
*)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 2 ;;
esac
