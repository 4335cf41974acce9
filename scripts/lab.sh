#!/usr/bin/env bash
# Installs what wiremesh needs (scripts/setup.sh), then runs `wiremesh lab ARGS...`.
#   bash scripts/lab.sh up --nodes 3     a 3-node mesh, checked with pings
#   bash scripts/lab.sh exec node1 -- wg show
#   bash scripts/lab.sh down
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/setup.sh"
exec "$here/.venv/bin/wiremesh" lab "${@:-up}"
