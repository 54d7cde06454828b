#!/usr/bin/env bash
# Make the base images docker-compose.yml and docker/cpu.Dockerfile name, where no image registry
# is reachable: a Debian minbase (debootstrap, run as root) imported as passk-ci/bookworm, then
# stand-ins built on it under the official names (docker/standin/*.Dockerfile):
#   python:3.11-slim-bookworm (Debian's python3 in a venv, headers, no compiler),
#   redis:7.2-alpine (Debian's redis-server 7.0), prom/prometheus:v2.53.2 (Debian's prometheus 2.42).
# The docker CLI talks to whatever DOCKER_HOST names. CA_BUNDLE (default: the host's pip bundle)
# replaces the image's CA certificates, for networks that inspect TLS; set it empty to keep Debian's.
#   sudo scripts/standin-images.sh
set -euo pipefail
cd "$(dirname "$0")/.."
packages=python3,python3-venv,libpython3.11-dev,ca-certificates,redis-server,prometheus,wget
bundle=${CA_BUNDLE-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

debootstrap --variant=minbase --include="$packages" bookworm "$work/rootfs" >"$work/debootstrap.log" \
    || { tail -20 "$work/debootstrap.log"; exit 1; }
if [ -n "$bundle" ] && [ -f "$bundle" ]; then
    cp "$bundle" "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
fi
rm -rf "$work/rootfs/var/cache/apt/archives"/*.deb
tar -C "$work/rootfs" -c . | docker import - passk-ci/bookworm:latest >/dev/null
mkdir "$work/empty"
for pair in python.Dockerfile=python:3.11-slim-bookworm redis.Dockerfile=redis:7.2-alpine \
            prometheus.Dockerfile=prom/prometheus:v2.53.2; do
    # the classic builder: these need no BuildKit feature, and any docker CLI has it
    DOCKER_BUILDKIT=0 docker build --network host -q -f "docker/standin/${pair%%=*}" -t "${pair#*=}" "$work/empty" >/dev/null
    echo "built ${pair#*=}"
done
