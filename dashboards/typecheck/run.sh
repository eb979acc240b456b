#!/usr/bin/env bash
# Type-check dashboards/flask-contexts.json against Grafana's published Dashboard type.
# npm ci installs exactly what package-lock.json pins (the first run downloads about 25 MB).
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund --loglevel=error
npx --no-install tsc -p tsconfig.json
echo "dashboard typecheck: ok"
