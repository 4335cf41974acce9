#!/usr/bin/env bash
# Builds the Vagrant lab's Debian 12 box for libvirt from Debian's archive only, and adds it to
# Vagrant as "wiremesh/bookworm" (WIREMESH_BOX_NAME). No box is downloaded from anywhere.
#
#   sudo vagrant/box/build.sh [--force] [--no-add]
#
# What is inside: debootstrap'ed Debian 12 (bookworm), Debian's own kernel (linux-image-amd64,
# with the WireGuard module) and initrd, systemd, systemd-networkd (DHCP on eth0), sshd, sudo,
# the "vagrant" user with Vagrant's insecure public key, and the project itself in /opt/wiremesh
# installed by its own installer (scripts/setup.sh run in the image's chroot: apt packages,
# Consul, the virtual environment with wiremesh and its Python dependencies, the compiled eBPF
# object). Provisioning a VM therefore needs no network beyond the lab's own.
#
# The disk is a bare ext4 file system (no partition table, no boot loader): the box's
# Vagrantfile boots Debian's kernel and initrd directly (libvirt's kernel/initrd/cmd_line).
# Output: vagrant/box/build/wiremesh-bookworm.box (+ vmlinuz, initrd.img, box.img).
# A box already added is kept unless --force. Root is needed (debootstrap, chroot).
# Environment: DEBIAN_MIRROR (default: the host's Debian mirror or deb.debian.org),
#              WIREMESH_BOX_NAME (default wiremesh/bookworm), WIREMESH_BOX_SIZE (default 6G).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=$here/build
name=${WIREMESH_BOX_NAME:-wiremesh/bookworm}
size=${WIREMESH_BOX_SIZE:-6G}
force=0 add=1
for a in "$@"; do
    case $a in
        --force) force=1 ;;
        --no-add) add=0 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $a" >&2; exit 2 ;;
    esac
done
say() { printf 'box: %s\n' "$*" >&2; }
[ "$(id -u)" -eq 0 ] || { say "must run as root (debootstrap, chroot)"; exit 1; }
for t in debootstrap qemu-img mkfs.ext4 vagrant; do
    command -v "$t" >/dev/null || { say "$t missing: run scripts/vagrant-setup.sh"; exit 1; }
done
if [ "$force" = 0 ] && [ "$add" = 1 ] && vagrant box list 2>/dev/null | grep -q "^$name "; then
    say "$name already added (rebuild with --force)"; exit 0
fi

mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
    mirror=$(awk '/^URIs:/ && /debian$/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
mirror=${mirror:-http://deb.debian.org/debian}

t_all=$SECONDS
mkdir -p "$out"
log=$out/build.log
: >"$log"
root=$(mktemp -d /var/tmp/wiremesh-box.XXXXXX)
mounted=()
cleanup() {
    local m
    for ((i=${#mounted[@]}-1; i>=0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done
    rm -rf --one-file-system "$root"
}
trap cleanup EXIT
step() {   # step "what" command...: runs it with its output in the log, prints its duration
    local what=$1 t0=$SECONDS; shift
    if ! "$@" >>"$log" 2>&1; then
        say "FAILED: $what (log: $log)"; tail -n 25 "$log" >&2; exit 1
    fi
    say "$what ($((SECONDS - t0)) s)"
}

base_pkgs=systemd,systemd-sysv,udev,dbus,linux-image-amd64,initramfs-tools,openssh-server,sudo,iproute2,kmod,procps,ca-certificates,netbase,python3,python3-venv,wireguard-tools,iputils-ping,less
step "debootstrap bookworm from $mirror" \
    debootstrap --variant=minbase --include="$base_pkgs" bookworm "$root" "$mirror"

configure() {
    echo wiremesh-box >"$root/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 wiremesh-box\n' >"$root/etc/hosts"
    printf '/dev/vda / ext4 defaults,noatime 0 1\n' >"$root/etc/fstab"
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" >"$root/etc/apt/sources.list"
    # The management interface (eth0, net.ifnames=0) by DHCP; Vagrant writes the others'
    # 50-vagrant-ethN.network files itself (its Debian guest uses systemd-networkd when enabled).
    mkdir -p "$root/etc/systemd/network"
    printf '[Match]\nName=eth0\n[Network]\nDHCP=ipv4\n[DHCPv4]\nClientIdentifier=mac\n' >"$root/etc/systemd/network/10-eth0.network"
    ln -sf /lib/systemd/system/systemd-networkd.service "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
    ln -sf /dev/null "$root/etc/systemd/system/systemd-networkd-wait-online.service"
    # Vagrant's user, its insecure key (replaced by a fresh key on first `vagrant up`), sudo.
    chroot "$root" useradd -m -s /bin/bash vagrant
    echo 'vagrant:vagrant' | chroot "$root" chpasswd
    echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >"$root/etc/sudoers.d/vagrant"
    chmod 0440 "$root/etc/sudoers.d/vagrant"
    install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
    key=$(find /usr/share/rubygems-integration /usr/lib/ruby /opt/vagrant -path '*/vagrant-*/keys/vagrant.pub' 2>/dev/null | head -n1)
    [ -n "$key" ] || { echo "Vagrant's insecure public key (keys/vagrant.pub) not found"; return 1; }
    install -m 0600 -o 1000 -g 1000 "$key" "$root/home/vagrant/.ssh/authorized_keys"
    printf 'UseDNS no\nPasswordAuthentication no\n' >"$root/etc/ssh/sshd_config.d/vagrant.conf"
    # sshd host keys are made at first boot (each VM its own), not baked into the box.
    rm -f "$root"/etc/ssh/ssh_host_*
    mkdir -p "$root/etc/systemd/system/ssh.service.d"
    # (before Debian's own `sshd -t` check, which fails without host keys)
    printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
        >"$root/etc/systemd/system/ssh.service.d/hostkeys.conf"
    echo wireguard >"$root/etc/modules-load.d/wireguard.conf"
}
step "configure (vagrant user, sshd, networkd, fstab)" configure

install_project() {
    # The project as it is in this checkout (without its venv, .git and build output).
    mkdir -p "$root/opt/wiremesh"
    tar -C "$repo" --exclude=./.venv --exclude=./.git --exclude='*/__pycache__' --exclude=./vagrant/box/build \
        --exclude=./vagrant/.vagrant --exclude='./tunnels/bpf/build' --exclude=./bench/results -cf - . \
        | tar -C "$root/opt/wiremesh" -xf -
    for m in proc sys dev dev/pts; do
        mount --bind "/$m" "$root/$m"; mounted+=("$root/$m")
    done
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    local cert=""
    if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then cp "$PIP_CERT" "$root/tmp/pip-ca.crt"; cert=/tmp/pip-ca.crt; fi
    # The project's own installer, in the image: apt packages, Consul, venv, eBPF object.
    chroot "$root" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        ${cert:+PIP_CERT=$cert} PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
        WIREMESH_SETUP_LOG=/var/log/wiremesh-setup.log LANG=C.UTF-8 \
        bash /opt/wiremesh/scripts/setup.sh
    ln -sf /opt/wiremesh/.venv/bin/wiremesh "$root/usr/local/bin/wiremesh"
    # The agent's unit, as on any host (vagrant/wiremesh-agent.service), not enabled yet.
    install -m 0644 "$repo/vagrant/wiremesh-agent.service" "$root/etc/systemd/system/wiremesh-agent.service"
    chroot "$root" apt-get clean
    rm -f "$root/tmp/pip-ca.crt" "$root/etc/resolv.conf"
    ln -sf /run/systemd/resolve/resolv.conf "$root/etc/resolv.conf"
    for ((i=${#mounted[@]}-1; i>=0; i--)); do umount "${mounted[i]}"; done
    mounted=()
    rm -rf "$root/var/lib/apt/lists"/* "$root/root/.cache"
    # Each VM its own machine id (made at first boot): a shared one gives every VM the same
    # DHCP client id on the management network, and libvirt's dnsmasq hands them one lease.
    : >"$root/etc/machine-id"
    rm -f "$root/var/lib/dbus/machine-id"
}
step "install wiremesh with scripts/setup.sh in the image (apt, Consul, venv, eBPF)" install_project

image() {
    rm -f "$out/root.ext4" "$out/box.img"
    cp -L "$root/vmlinuz" "$out/vmlinuz"
    cp -L "$root/initrd.img" "$out/initrd.img"
    chmod 0644 "$out/vmlinuz" "$out/initrd.img"
    truncate -s "$size" "$out/root.ext4"
    mkfs.ext4 -q -F -L wiremesh-root -d "$root" "$out/root.ext4"
    qemu-img convert -f raw -O qcow2 "$out/root.ext4" "$out/box.img"
    rm -f "$out/root.ext4"
    local vsize
    vsize=$(qemu-img info --output=json "$out/box.img" | python3 -c 'import json,sys; print(-(-json.load(sys.stdin)["virtual-size"] // 2**30))')
    printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %s}\n' "$vsize" >"$out/metadata.json"
    cat >"$out/Vagrantfile" <<'VF'
# The wiremesh box (vagrant/box/build.sh): Debian's kernel and initrd booted directly.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0 biosdevname=0 quiet"
  end
end
VF
    tar -C "$out" -cf "$out/wiremesh-bookworm.box" metadata.json Vagrantfile box.img vmlinuz initrd.img
}
step "image: ext4 ($size) -> qcow2 -> box" image

if [ "$add" = 1 ]; then
    step "vagrant box add $name" vagrant box add --force --name "$name" "$out/wiremesh-bookworm.box"
    rm -f "$out/wiremesh-bookworm.box"
fi
say "done in $((SECONDS - t_all)) s: $name ($(du -h "$out/box.img" | cut -f1) qcow2, kernel $(ls "$root"/lib/modules 2>/dev/null || true))"
