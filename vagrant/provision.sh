#!/usr/bin/env bash
# Provisions one VM of the Vagrant lab (run by Vagrant as root inside the VM); needs no network
# beyond the lab's own when the box is the local one (vagrant/box/build.sh).
#   provision.sh NAME ADDRESS ROUTER [--consul DATACENTER OTHER_SERVERS] [--node CLUSTER CONSUL_URL]
# NAME: the VM (and node) name; ADDRESS: its underlay address; ROUTER: 10.99.c.1, the gateway to
# the other clusters' networks where each cluster has its own /24 (libvirt).
# --consul: a Consul server of DATACENTER, WAN-joined to OTHER_SERVERS (comma-separated).
# --node: a wiremesh node of CLUSTER: /etc/wiremesh/agent.toml and the wiremesh-agent unit
# (enabled, started by test-federation.sh once the clusters are connected).
set -euo pipefail
name=$1 addr=$2 router=$3; shift 3
consul_dc="" others="" cluster="" consul_url=""
while [ $# -gt 0 ]; do
    case $1 in
        --consul) consul_dc=$2 others=$3; shift 3 ;;
        --node) cluster=$2 consul_url=$3; shift 3 ;;
        *) echo "provision.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
say() { printf 'provision %s: %s\n' "$name" "$*"; }

# The project's own installer: on the local box everything is there already ("ready").
bash /opt/wiremesh/scripts/setup.sh
[ -e /usr/local/bin/wiremesh ] || ln -s /opt/wiremesh/.venv/bin/wiremesh /usr/local/bin/wiremesh

# Name (Vagrant's own "Setting hostname" costs ~30 s per VM under emulation).
if [ "$(hostname)" != "$name" ]; then
    hostname "$name"; echo "$name" >/etc/hostname
    sed -i "/^127\.0\.1\.1 /d" /etc/hosts; echo "127.0.1.1 $name" >>/etc/hosts
fi

# The other clusters' networks through the router, where this cluster has its own /24.
dev=$(ip -o -4 addr show | awk -v a="$addr" '{split($4, p, "/"); if (p[1] == a) print $2 "/" p[2]}')
if [ "${dev#*/}" = 24 ]; then
    ifname=${dev%/*}
    ip route replace 10.99.0.0/16 via "$router" dev "$ifname"
    d=/etc/systemd/network/50-vagrant-$ifname.network.d
    mkdir -p "$d"
    printf '[Route]\nDestination=10.99.0.0/16\nGateway=%s\n' "$router" >"$d/wiremesh-route.conf"
fi

if [ -n "$consul_dc" ]; then
    mkdir -p /etc/wiremesh /var/lib/wiremesh-consul
    join=$(printf '%s' "$others" | awk -F, '{for (i=1;i<=NF;i++) printf "%s\"%s\"", (i>1?",":""), $i}')
    cat >/etc/wiremesh/consul.json <<JSON
{"datacenter": "$consul_dc", "node_name": "$name", "server": true, "bootstrap_expect": 1,
 "data_dir": "/var/lib/wiremesh-consul", "bind_addr": "$addr", "client_addr": "$addr 127.0.0.1",
 "retry_join_wan": [$join], "retry_interval_wan": "5s", "ports": {"dns": -1},
 "disable_update_check": true, "log_level": "warn"}
JSON
    cat >/etc/systemd/system/wiremesh-consul.service <<UNIT
[Unit]
Description=Consul server for the wiremesh Vagrant lab (datacenter $consul_dc)
Wants=network-online.target
After=network-online.target
[Service]
ExecStart=/usr/local/bin/consul agent -config-file=/etc/wiremesh/consul.json
Restart=on-failure
RestartSec=2
[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable --now wiremesh-consul
    say "Consul server of datacenter $consul_dc at $addr, WAN-joining ${others:-nobody}"
fi

if [ -n "$cluster" ]; then
    mkdir -p /etc/wiremesh
    cat >/etc/wiremesh/agent.toml <<TOML
node = "$name"
cluster = "$cluster"
underlay_address = "$addr"
backend = "auto"
[consul]
address = "$consul_url"
TOML
    [ -f /etc/systemd/system/wiremesh-agent.service ] || install -m 0644 /opt/wiremesh/vagrant/wiremesh-agent.service /etc/systemd/system/
    systemctl daemon-reload
    systemctl enable wiremesh-agent 2>/dev/null
    say "node $name of cluster $cluster, Consul at $consul_url (agent enabled; started once the clusters are set up)"
fi
modprobe wireguard && say "kernel WireGuard module: loaded"
