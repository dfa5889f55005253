#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (CI runs exactly this through .ci/run); arguments go to pytest, e.g.
# `bash scripts/test.sh -m "not slow"` for the fast tier.
#
# Setup needs the package index; the tests must not. Where the machine allows it (root, or user namespaces), pytest
# runs in a network namespace of its own with only the loopback interface up, so a test that reaches for the network
# fails here as it would on an offline machine; servers the tests start still bind 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One pytest worker per core; a test file's tests stay on one worker, so its module fixtures (a served repository)
# are built once. Files are handed out in collection order, which tests/conftest.py starts with the longest files.
PARALLEL=(-n 2 --dist loadfile --no-loadscope-reorder)
cut=()
if command -v unshare >/dev/null && command -v ip >/dev/null; then
  if unshare --net true 2>/dev/null; then
    cut=(unshare --net)
  elif unshare --net --map-root-user true 2>/dev/null; then
    cut=(unshare --net --map-root-user)
  fi
fi
if [ ${#cut[@]} -gt 0 ]; then
  echo "running the tests without network (loopback only)"
  exec "${cut[@]}" sh -c 'ip link set lo up && exec "$@"' sh .venv/bin/python -m pytest tests "${PARALLEL[@]}" "$@"
fi
echo "running the tests with the network reachable (no network namespace available here)"
exec .venv/bin/python -m pytest tests "${PARALLEL[@]}" "$@"
