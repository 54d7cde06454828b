# The CPU image: every passk service (verifier, rollout with the transformers backend, trainer),
# the tiny maze model and its data. Build from the repository root:
#   docker build -f docker/cpu.Dockerfile -t passk:cpu .
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # the healthcheck below probes this; compose and Kubernetes set their own per service
    PASSK_HEALTHCHECK_URL=http://127.0.0.1:8200/healthz

WORKDIR /app
# torch from its CPU index first: PyPI's default torch is the multi-GB CUDA build
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY proto proto
COPY services services
COPY configs configs
# editable, so that proto/ stays next to services/; the gRPC stubs are generated now, as root,
# because the services run as a user who cannot write here
RUN pip install -e . \
 && python -c "from services.common import proto; proto.load('weights')"

# The CPU presets' model and data, built once here (deterministic: seed 0, one thread), so that
# every replica and the trainer start from the same bytes.
RUN passk model build-tiny --out models/tiny-maze --threads 1 \
 && passk data maze --out data/maze-tiny --train-size 7 --test-size 7 --train-per-size 5000 --test-per-size 100 --seed 0

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin passk \
 && mkdir -p runs && chown passk:passk runs
USER 10001

# verifier 8100, rollout HTTP 8200 and gRPC weights 50051, trainer metrics 9400
EXPOSE 8100 8200 50051 9400
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "exec passk healthcheck \"$PASSK_HEALTHCHECK_URL\""]
ENTRYPOINT []
CMD ["passk", "--help"]
