#!/usr/bin/env bash
# The README's first command, timed as a new user meets it: a fresh clone, `make demo`, and the
# first chat completion through the router. PIP_NO_CACHE_DIR=1 makes pip fetch every package.
#   bench/first_run.sh [REPO] [CLONE_DIR]
set -euo pipefail
repo=${1:-$(cd "$(dirname "$0")/.." && pwd)}
dir=${2:-$(mktemp -d)/lessor}
git clone -q "$repo" "$dir"
cd "$dir"
log=$dir/first_run.log
start=$(date +%s.%N)
setsid make demo >"$log" 2>&1 &
group=$!
trap 'kill -- -$group 2>/dev/null || true' EXIT
until grep -q "OpenAI router on" "$log"; do
  kill -0 $group 2>/dev/null || { echo "make demo ended before serving:"; tail -20 "$log"; exit 1; }
  sleep 1
done
served=$(date +%s.%N)
curl -sf localhost:8481/v1/chat/completions \
  -d '{"model":"a","messages":[{"role":"user","content":"Hello"}],"max_tokens":8}' >/dev/null
answered=$(date +%s.%N)
grep "^==>" "$log"
python3 -c "import sys; s, v, a = map(float, sys.argv[1:]); print(f'fresh clone to serving: {v - s:.0f} s; first chat answered at {a - s:.0f} s')" \
  "$start" "$served" "$answered"
