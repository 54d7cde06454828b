"""Messages that travel the Redis streams, validated on both ends.

prompts stream:   PromptJob     trainer -> rollout replicas
rollouts stream:  RolloutGroup  rollout -> verifiers
scored stream:    ScoredGroup   verifier -> trainer

One job is one prompt and its N samples, so a group is never split. Every
message carries the policy version that produced it.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TEXT = 65_536  # characters of a prompt or reference
MAX_SAMPLE_TEXT = 16 << 20  # characters of a sample: the verifier, not the queue, decides what is too long
Identifier = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")


GREEDY_BELOW = 1e-5  # vLLM's own threshold for greedy sampling
MAX_SEED = 2**63 - 1  # torch's generators take a signed 64-bit seed (2**64 made a 500, found by schemathesis)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class SamplingParams(Message):
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    """Softmax temperature; 0 (and anything below 1e-5, as in vLLM) means greedy."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    max_tokens: int = Field(64, ge=1, le=32_768)
    """New tokens per sample at most."""
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    """Seed of the sampling, for reproducible rollouts."""
    stop: tuple[str, ...] = Field((), max_length=8)
    """Strings that end a sample; the text stops before the first, the tokens that made it stay."""

    @field_validator("temperature")
    @classmethod
    def _greedy_below_epsilon(cls, temperature: float) -> float:
        # logits / 1e-75 overflow to inf and the sampler's probabilities to NaN: such a
        # temperature is greedy in all but name (found by the schemathesis test)
        return 0.0 if temperature < GREEDY_BELOW else temperature

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: tuple[str, ...]) -> tuple[str, ...]:
        if any(not 1 <= len(s) <= 256 for s in stop):
            raise ValueError("each stop string must have 1 to 256 characters")
        return stop


class PromptJob(Message):
    job_id: str = Identifier
    """Unique id of this job; the dedupe key is (job_id, policy_version)."""
    prompt_id: str = Identifier
    """Id of the prompt in its dataset."""
    task: str = Identifier
    """Task name, which picks the grader (e.g. 'maze')."""
    policy_version: int = Field(ge=0)
    """Policy version the rollouts must come from."""
    policy_epoch: int = Field(0, ge=0)
    """The trainer run's epoch of that version (it rises when a trainer starts or resumes)."""
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    """The text the model continues."""
    reference: str = Field(max_length=MAX_TEXT)
    """What the grader checks against (the maze grid, the gold answer)."""
    n: int = Field(ge=1, le=4096)
    """Samples to draw (N_rollout)."""
    sampling: SamplingParams = SamplingParams()
    """Sampling parameters."""


class Sample(Message):
    text: str = Field(max_length=MAX_SAMPLE_TEXT)
    """The generated text."""
    token_ids: list[int] = Field(max_length=32_768)
    """Generated token ids."""
    logprobs: list[float] = Field(max_length=32_768)
    """Log-probability of each generated token under the sampling policy."""

    @model_validator(mode="after")
    def _same_length(self) -> Sample:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"token_ids ({len(self.token_ids)}) and logprobs ({len(self.logprobs)}) differ in length")
        return self


class RolloutGroup(Message):
    job: PromptJob
    """The job these samples answer."""
    policy_version: int = Field(ge=0)
    """Version of the weights that generated the samples."""
    policy_epoch: int = Field(0, ge=0)
    """Epoch of those weights."""
    prompt_token_ids: list[int] = Field(min_length=1, max_length=32_768)
    """The tokenized prompt."""
    samples: list[Sample] = Field(min_length=1, max_length=4096)
    """N samples of the prompt."""
    replica: str = Identifier
    """Id of the rollout replica that generated them."""

    @model_validator(mode="after")
    def _n_samples(self) -> RolloutGroup:
        if len(self.samples) != self.job.n:
            raise ValueError(f"job asked for {self.job.n} samples, group has {len(self.samples)}")
        return self


class VerdictStatus(StrEnum):
    CORRECT = "correct"
    WRONG = "wrong"
    TIMEOUT = "timeout"
    GRADER_ERROR = "grader_error"
    INVALID_REQUEST = "invalid_request"


class Verdict(Message):
    reward: float = Field(ge=-1e6, le=1e6)
    """The reward; only meaningful for correct and wrong."""
    status: VerdictStatus
    """Correct and wrong are answers; the others are failures never trained on as 0."""
    detail: str = Field("", max_length=1024)
    """Why, for failures."""
    grader: str = Identifier
    """Grader name."""
    elapsed: float = Field(ge=0.0)
    """Seconds the grading took."""
    outcome: str = Field("", max_length=256)
    """The response's final answer in a normal form (services/verifier/outcomes.py); empty: none.
    The trainer's outcome-based exploration counts these per prompt."""

    @property
    def failed(self) -> bool:
        return self.status not in (VerdictStatus.CORRECT, VerdictStatus.WRONG)


class ScoredGroup(Message):
    group: RolloutGroup
    """The graded rollouts."""
    verdicts: list[Verdict] = Field(min_length=1, max_length=4096)
    """One verdict per sample, in order."""

    @model_validator(mode="after")
    def _one_per_sample(self) -> ScoredGroup:
        if len(self.verdicts) != len(self.group.samples):
            raise ValueError(f"{len(self.verdicts)} verdicts for {len(self.group.samples)} samples")
        return self
