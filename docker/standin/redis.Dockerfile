# Stand-in for redis:7.2-alpine where no image registry is reachable: Debian's redis-server (7.0)
# on the local Debian minbase. docker-compose.yml runs `redis-server ...` and checks `redis-cli ping`.
ARG BASE=passk-ci/bookworm:latest
FROM ${BASE}
RUN mkdir -p /data
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
