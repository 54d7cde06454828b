"""passk: Pass@k reinforcement learning from verifiable rewards, as a set of services.

Components live in sibling packages and share only ``services.common``:
``rollout`` (engines), ``verifier`` (graders), ``trainer`` (advantages, loss,
training loop) and ``tasks`` (datasets and prompts).
"""

__version__ = "0.1.0"
