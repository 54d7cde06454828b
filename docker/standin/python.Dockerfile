# Stand-in for python:3.11-slim-bookworm where no image registry is reachable (CI here): Debian's
# python3 in a venv on a local Debian minbase (tests/docker/engine.py makes BASE with debootstrap).
# Like the official slim image it has no compiler, so a build on it shows what a slim base lacks.
ARG BASE=passk-ci/bookworm:latest
FROM ${BASE}
RUN python3 -m venv /usr/local/python \
 && /usr/local/python/bin/pip --version
ENV PATH=/usr/local/python/bin:$PATH \
    LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
