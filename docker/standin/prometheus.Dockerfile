# Stand-in for prom/prometheus where no image registry is reachable: Debian's prometheus (2.42) on the
# local Debian minbase, at the official image's path (/bin/prometheus) with its healthcheck's wget.
ARG BASE=passk-ci/bookworm:latest
FROM ${BASE}
RUN mkdir -p /prometheus /etc/prometheus && test -x /bin/prometheus && command -v wget
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
