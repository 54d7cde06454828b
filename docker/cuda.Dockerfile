# The GPU image: the same services on CUDA, with vLLM as the rollout engine and NCCL for the
# trainer's ranks. vLLM's own image brings CUDA, torch and vllm built for each other.
#   docker build -f docker/cuda.Dockerfile -t passk:cuda .
# Models are not baked in: mount a HF-format checkpoint (e.g. Qwen2.5-7B-Instruct) at /app/models.
FROM vllm/vllm-openai:v0.11.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PASSK_HEALTHCHECK_URL=http://127.0.0.1:8200/healthz

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto proto
COPY services services
COPY configs configs
# [vllm] is already satisfied by the base image; pip keeps its torch (inside our range)
RUN pip install -e ".[vllm]" \
 && python3 -c "from services.common import proto; proto.load('weights')"
# The data of the GPU presets: mazes (sizes 7-21, the paper's Table 4 split) and the puzzles of the
# Enigmata-like mixture (two reasoning-gym tasks per Enigmata category)
RUN passk data maze --out data/maze --seed 0 \
 && passk data puzzles --out data/puzzles --seed 0

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin passk \
 && mkdir -p runs models && chown passk:passk runs models
USER 10001

EXPOSE 8100 8200 50051 9400 29500
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["sh", "-c", "exec passk healthcheck \"$PASSK_HEALTHCHECK_URL\""]
# the base image's entrypoint starts vLLM's own server
ENTRYPOINT []
CMD ["passk", "--help"]
