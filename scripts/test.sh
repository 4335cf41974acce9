#!/usr/bin/env bash
# Runs the whole test suite: installs what it needs (scripts/setup.sh), then unit tests (no
# root needed) and integration tests (root: namespaces, real Consul, real wireguard-go).
# Extra arguments go to pytest, e.g. scripts/test.sh -k mesh -x
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/setup.sh"
cd "$here"
# Undefined names and syntax errors fail fast, before the slow integration tests.
.venv/bin/ruff check --select F,E9 --quiet agent tunnels keys clustermesh lab cli cni wiremesh bench tests scripts
# mypy --strict over wiremesh as installed (its subpackages are the folders above; see the script).
.venv/bin/python scripts/typecheck.py
set +e
.venv/bin/python -m pytest -ra "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass.
[ "$rc" -eq 5 ] && echo "test.sh: pytest collected no tests" >&2
exit "$rc"
