#!/usr/bin/env bash
# Provisions one VM of the Vagrant lab with the project's own setup (scripts/setup.sh).
#   provision.sh consul DATACENTER BIND_IP OTHER_SERVERS(comma-separated)
#   provision.sh node CLUSTER UNDERLAY_IP CONSUL_URL NODE_NAME
set -euo pipefail
role=$1; shift
cd /vagrant
bash scripts/setup.sh

case "$role" in
consul)
    dc=$1 bind=$2 others=$3
    mkdir -p /etc/wiremesh /var/lib/wiremesh-consul
    join=$(printf '%s' "$others" | awk -F, '{for (i=1;i<=NF;i++) printf "%s\"%s\"", (i>1?",":""), $i}')
    cat > /etc/wiremesh/consul.json <<JSON
{"datacenter": "$dc", "server": true, "bootstrap_expect": 1, "data_dir": "/var/lib/wiremesh-consul",
 "bind_addr": "$bind", "client_addr": "$bind 127.0.0.1", "retry_join_wan": [$join],
 "ports": {"dns": -1}, "disable_update_check": true}
JSON
    cat > /etc/systemd/system/wiremesh-consul.service <<UNIT
[Unit]
Description=Consul server for the wiremesh Vagrant lab
After=network-online.target
[Service]
ExecStart=/usr/local/bin/consul agent -config-file=/etc/wiremesh/consul.json
Restart=on-failure
[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable --now wiremesh-consul
    ;;
node)
    cluster=$1 ip=$2 consul=$3 node=$4
    mkdir -p /etc/wiremesh
    cat > /etc/wiremesh/agent.toml <<TOML
node = "$node"
cluster = "$cluster"
underlay_address = "$ip"
[consul]
address = "$consul"
TOML
    cat > /etc/systemd/system/wiremesh-agent.service <<UNIT
[Unit]
Description=wiremesh node agent
After=network-online.target
[Service]
ExecStart=/vagrant/.venv/bin/wiremesh agent --config /etc/wiremesh/agent.toml
Restart=on-failure
KillSignal=SIGTERM
[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable wiremesh-agent   # started by federation-test.sh once the clusters are set up
    ;;
*)
    echo "provision.sh: unknown role $role" >&2
    exit 2
    ;;
esac
