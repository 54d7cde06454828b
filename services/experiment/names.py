"""What the reports call each method: the paper's names where it has one (Table 7's "P@k T. w/ AD"),
the cited paper's otherwise. Variants of an experiment file carry their own label (``spec``)."""

from __future__ import annotations

NAMES = {
    "grpo": "P@1 T. (GRPO)",
    "passk_full": "P@k T. w/ FS",
    "passk_bootstrap": "P@k T. w/ BS",
    "passk_analytic": "P@k T. w/ AD",
    "passk_combination": "Combination (Eq. 18)",
    "passk_exceeding": "Exceeding (Eq. 17)",
    "passk_adaptive": "Adaptive (entropy)",
    "pkpo": "PKPO",
    "tang_passn": "Tang pass@n",
    "maxrl": "MaxRL",
    "rs_grpo": "RS-GRPO",
    "w_reinforce": "W-REINFORCE",
    "nsr": "NSR",
    "psr": "PSR",
}


def method_name(method: str) -> str:
    """The report's name of an estimator (its registry name when the table has none)."""
    return NAMES.get(method, method)
