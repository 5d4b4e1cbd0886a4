#!/usr/bin/env bash
# Tools the tests need beyond the Python environment (idempotent; each is skipped when already present).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "tools: nothing beyond the Python environment yet"
