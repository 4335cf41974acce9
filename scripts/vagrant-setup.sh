#!/usr/bin/env bash
# Installs the host packages of the Vagrant lab (vagrant/), as root, idempotently, on Debian 12:
# Vagrant with the libvirt plugin, libvirt, QEMU, and the tools that build the local box
# (debootstrap, qemu-img, mkfs.ext4). Separate from scripts/setup.sh on purpose: CI and the
# namespace lab do not need a hypervisor.
#   bash scripts/vagrant-setup.sh
# Output: one line per step; apt's own output goes to the log (WIREMESH_SETUP_LOG, default
# /var/log/wiremesh-vagrant-setup.log).
set -euo pipefail
logf=${WIREMESH_SETUP_LOG:-/var/log/wiremesh-vagrant-setup.log}
say() { printf 'vagrant-setup: %s\n' "$*" >&2; }
[ "$(id -u)" -eq 0 ] || { say "must run as root (it installs apt packages)"; exit 1; }

pkgs=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
      debootstrap e2fsprogs dnsmasq-base iptables tcpdump iproute2 ebtables util-linux python3-yaml)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    t0=$SECONDS
    say "apt install ${missing[*]} (log: $logf)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } >>"$logf" 2>&1; then
        say "FAILED: apt install (see $logf)"; tail -n 20 "$logf" >&2; exit 1
    fi
    say "installed ${#missing[@]} packages in $((SECONDS - t0)) s"
fi

# libvirt runs QEMU as root without a security driver: the build machines have no systemd as
# PID 1, no AppArmor profiles loaded and the box files are owned by root.
conf=/etc/libvirt/qemu.conf
if ! grep -q '^# wiremesh-vagrant' "$conf" 2>/dev/null; then
    cat >>"$conf" <<'C'
# wiremesh-vagrant: QEMU as root, no security driver (see scripts/vagrant-setup.sh)
user = "root"
group = "root"
security_driver = "none"
C
    say "configured $conf (user/group root, security_driver none)"
fi
say "ready: $(vagrant --version 2>/dev/null), $(qemu-system-x86_64 --version | head -1)"
