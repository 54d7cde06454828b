# The CPU image: every passk service (verifier, rollout with the transformers backend, trainer),
# the repository's tiny models and the maze-tiny data. Build from the repository root:
#   docker build -f docker/cpu.Dockerfile -t passk:cpu .
# Without the PyTorch index (offline, or a mirror): point TORCH_INDEX_URL at a mirror, or put the
# torch CPU wheel in docker/wheels/ and set it empty:
#   docker build -f docker/cpu.Dockerfile --build-arg TORCH_INDEX_URL= -t passk:cpu .
# Without Docker Hub: PYTHON_IMAGE names the same image in a mirror, or a local stand-in
# (scripts/standin-images.sh makes one under the official name).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# the CPU build by name: with the wheels of docker/wheels, PyPI only serves torch's own dependencies
ARG TORCH_VERSION=2.13.0+cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # the healthcheck below probes this; compose and Kubernetes set their own per service
    PASSK_HEALTHCHECK_URL=http://127.0.0.1:8200/healthz

WORKDIR /app
# torch first, from its CPU index or docker/wheels: PyPI's default torch is the multi-GB CUDA build.
# A bind mount, so that a wheel there is not copied into a layer.
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} --find-links /wheels "torch==$TORCH_VERSION"

# The dependencies first, from pyproject.toml alone, so that a change to the code rebuilds only the
# layers below. Some (reasoning-gym's pycosat) are published as source only: a compiler for the
# build, removed in the same layer.
COPY pyproject.toml README.md ./
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && apt-get purge -y --auto-remove gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* /tmp/requirements.txt

COPY proto proto
COPY services services
COPY configs configs
# Editable, so that proto/ stays next to services/; the gRPC stubs are generated now, as root,
# because the services run as a user who cannot write here.
RUN pip install --no-deps -e . \
 && python -c "from services.common import proto; proto.load('weights')"

# The repository's tiny models, as committed (every replica and the trainer start from the same
# bytes), and the maze-tiny preset's data (deterministic, seed 0).
COPY models/tiny-maze models/tiny-maze
COPY models/tiny-mixture models/tiny-mixture
RUN passk data maze --out data/maze-tiny --train-size 7 --test-size 7 --train-per-size 5000 --test-per-size 100 --seed 0

# The service user reads everything under /app whatever modes the build context had (a checkout
# made under umask 077 gives 0600 files, which user 10001 could not open); it writes only runs/.
RUN chmod -R a+rX /app \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin passk \
 && mkdir -p runs && chown passk:passk runs
USER 10001

# verifier 8100, rollout HTTP 8200 and gRPC weights 50051, trainer metrics 9400
EXPOSE 8100 8200 50051 9400
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "exec passk healthcheck \"$PASSK_HEALTHCHECK_URL\""]
ENTRYPOINT []
CMD ["passk", "--help"]
