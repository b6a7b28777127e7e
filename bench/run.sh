#!/usr/bin/env bash
# C-STORE ingest: medd central vs Orthanc and DCMTK storescp, in one run.
#   bash bench/run.sh                       # 3 reps, small + large corpora
#   REPS=5 bash bench/run.sh --json /tmp/bench.json
# Extra arguments go to bench/bench_cstore.py (see --help).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
for tool in storescu storescp; do
  [ -x "/usr/bin/$tool" ] || { echo "DCMTK $tool missing: apt-get install dcmtk" >&2; exit 1; }
done
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || { echo "Orthanc missing: apt-get install orthanc" >&2; exit 1; }
[ -x "$REPO/.venv/bin/twistd" ] || make -C "$REPO" venv
exec "$REPO/.venv/bin/python" "$HERE/bench_cstore.py" --reps "${REPS:-3}" "$@"
