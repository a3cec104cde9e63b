#!/usr/bin/env bash
# Renders a run's report.html in headless Chromium to a PNG, to check it displays.
#   bash scripts/render_report.sh runs/digits_demo/report.html report.png
# Needs Debian's chromium (apt-get install chromium); offline flags keep it off the network.
set -euo pipefail
report=$(realpath "$1"); out=${2:-report.png}
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --window-size=1200,3000 --screenshot="$out" "file://$report"
rm -rf "$profile"
echo "$out"
