#!/usr/bin/env bash
# Write the tokens kustomize puts in the passk-tokens Secret (never committed: .gitignore).
#   scripts/k8s-tokens.sh [k8s/base/tokens.env]
set -euo pipefail
out=${1:-k8s/base/tokens.env}
if [[ -e $out ]]; then
    echo "$out exists; delete it first to make new tokens" >&2
    exit 1
fi
umask 077
printf 'PASSK_TOKEN=%s\n' "$(python3 -c 'import secrets; print(secrets.token_hex(32))')" > "$out"
echo "wrote $out"
