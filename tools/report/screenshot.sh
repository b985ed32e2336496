#!/usr/bin/env bash
# Renders an agfsync report in headless Chromium (Debian: apt-get install
# chromium) and writes a full-page PNG screenshot to look at, so a change to
# the report's HTML is checked in a real browser. CI does not need this.
#
#   tools/report/screenshot.sh RUN_DIR/report.html [out.png]
#
# Fails if Chromium reports a problem loading the page or writes no image.
# The page must render offline: Chromium runs with networking disabled
# (--host-resolver-rules), so a report that needed an external URL would
# show broken content in the screenshot.
set -euo pipefail
report=$(realpath "$1")
out=${2:-${report%.html}.png}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "no Chromium found: apt-get install chromium" >&2
  exit 2
fi
rm -f "$out"
"$browser" --headless=new --no-sandbox --disable-gpu --hide-scrollbars \
  --host-resolver-rules="MAP * ~NOTFOUND" \
  --window-size=1200,3000 --screenshot="$out" "file://$report" 2>/tmp/agfsync-chromium.log || {
  cat /tmp/agfsync-chromium.log >&2
  exit 1
}
test -s "$out" || { echo "no screenshot written" >&2; exit 1; }
echo "$out"
