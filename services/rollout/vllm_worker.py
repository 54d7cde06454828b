"""Methods vLLM mixes into its worker (``worker_extension_cls``), called through
``LLM.collective_rpc`` by name, so no pickled function travels to the worker."""

from __future__ import annotations


class WeightReloader:
    def reload_from_file(self, path: str) -> None:
        """Load a safetensors file of HF-named tensors into the running model."""
        from safetensors.torch import load_file

        self.reload_weights(weights_iterator=iter(load_file(path).items()))  # type: ignore[attr-defined]
