"""Rollout servers: engine backends (vLLM, transformers), the queue worker, the
HTTP app and the gRPC weight receiver (see the project issues for status)."""
