#!/usr/bin/env bash
# Run on the first cluster's Consul VM once `vagrant up` finished: connects the clusters with
# the wizard's non-interactive path (answers generated from the topology) and lists them;
# then prints how to start the agents on the node VMs.
set -euo pipefail
cd /vagrant
topology=${WIREMESH_TOPOLOGY:-lab/topologies/default.yaml}
.venv/bin/python - "$topology" > /tmp/wiremesh-answers.json <<'PY'
import json, sys, yaml
t = yaml.safe_load(open(sys.argv[1]))
print(json.dumps({"clusters": [
    {"consul": f"http://10.99.{i}.1:8500", "name": c["name"], "id": c["id"], "pod_cidr": c["pod_cidr"],
     "datacenter": c.get("datacenter", c["name"]), "routing": c.get("routing", "wireguard")}
    for i, c in enumerate(t["clusters"])]}))
PY
.venv/bin/wiremesh --consul http://10.99.0.1:8500 setup --answers /tmp/wiremesh-answers.json --yes
.venv/bin/wiremesh --consul http://10.99.0.1:8500 cluster list
echo "now, on every node VM: sudo systemctl start wiremesh-agent"
echo "then, on any node:     sudo /vagrant/.venv/bin/wiremesh --consul http://10.99.0.1:8500 cluster status"
