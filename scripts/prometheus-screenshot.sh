#!/usr/bin/env bash
# Screenshot of Prometheus's own graph page: trainer reward, batch pass@k and held-out pass@k.
#   scripts/prometheus-screenshot.sh http://127.0.0.1:PORT docs/img/prometheus-reward-passk.png [RANGE]
# (the URL `passk up --prometheus` prints; needs Debian's chromium).
set -euo pipefail
url=${1:?Prometheus URL}
out=${2:?output PNG}
range=${3:-15m}
graph() { echo "g$1.expr=$2&g$1.tab=0&g$1.range_input=$range"; }
query="$(graph 0 passk_trainer_reward_mean)&$(graph 1 passk_trainer_batch_pass_at_k)&$(graph 2 passk_trainer_eval_pass_at_k)"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# no background networking: the closed network here refuses it, many times at each start
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
    --window-size=1400,2350 --virtual-time-budget=15000 --screenshot="$out" "$url/graph?$query" 2>/dev/null
echo "wrote $out"
