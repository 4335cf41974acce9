#!/usr/bin/env bash
# The project's kernel-backend integration test (tests/integration/test_kernel_backend.py) where
# the WireGuard module exists: in one VM of the Vagrant lab (the topology's first node), with
# this checkout's code. On hosts without the module (the build machines) that test skips.
#
#   sudo vagrant/test-kernel-backend.sh [-- PYTEST_ARGS...]
#
# Builds the box if it is missing, boots the VM, runs pytest there (other arguments after `--`:
# any test of the project, e.g. `-- -x tests/integration/test_mesh.py`), prints pass/fail and
# destroys everything, whatever happened (test-federation.sh --up --destroy --kernel-only).
# The pytest output: vagrant/.vagrant/kernel-backend.log. About 3 minutes here with the box.
set -euo pipefail
exec "$(cd "$(dirname "$0")" && pwd)/test-federation.sh" --up --destroy --kernel-only "$@"
