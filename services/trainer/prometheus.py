"""The trainer's Prometheus metrics, served at http://<host>:<metrics_port>/metrics
(rank 0): the per-step training metrics, the step time by phase, and the
held-out pass@k of the latest evaluation."""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# per-step values exported as gauges: metrics.jsonl key -> (metric name, help)
GAUGES = {
    "version": ("passk_trainer_policy_version", "Policy version after the latest step"),
    "step": ("passk_trainer_step", "Latest finished training step"),
    "reward_mean": ("passk_trainer_reward_mean", "Mean reward of the latest step's valid responses"),
    "positive_fraction": ("passk_trainer_positive_fraction", "Fraction of the latest step's responses that passed"),
    "adv_abs_mean": ("passk_trainer_advantage_abs_mean", "Mean |advantage| of the latest step"),
    "eta_mean": ("passk_trainer_eta_mean", "Mean per-group sum of |advantage| (the paper's eta)"),
    "entropy": ("passk_trainer_policy_entropy", "Mean token entropy of the latest step's responses"),
    "negative_diversity": (
        "passk_trainer_negative_diversity",
        "Distinct answers among a prompt's wrong responses over their number, latest step (Figure 7a)",
    ),
    "response_tokens": ("passk_trainer_response_tokens", "Mean response length of the latest step, in tokens"),
    "clip_fraction": ("passk_trainer_clip_fraction", "Fraction of tokens whose ratio was clipped"),
    "token_shaped_fraction": (
        "passk_trainer_token_shaped_fraction",
        "Fraction of tokens a token-level option held back (top_entropy, covariance)",
    ),
    "grad_norm": ("passk_trainer_grad_norm", "Gradient norm before clipping, mean over the step's updates"),
    "kl": ("passk_trainer_kl", "KL estimate to the reference policy (0 without one)"),
    "lr": ("passk_trainer_learning_rate", "Learning rate after the latest update"),
    "weight_sync_bytes": (
        "passk_trainer_weight_sync_bytes",
        "Bytes the trainer sent for the latest version (its answered pushes; relays send the rest)",
    ),
    "weight_relay_depth": (
        "passk_trainer_weight_relay_depth",
        "Links from the trainer to the farthest replica in the latest push (1: a star; weights_fanout)",
    ),
    "staleness_mean": ("passk_trainer_staleness_mean", "Mean versions between sampling and training"),
    "all_wrong_fraction": (
        "passk_trainer_all_wrong_fraction",
        "Share of the latest step's groups with no correct answer",
    ),
    "all_right_fraction": (
        "passk_trainer_all_right_fraction",
        "Share of the latest step's groups with only correct answers",
    ),
    "alpha_k_mean": (
        "passk_trainer_alpha_k_mean",
        "Mean weight k(1 - p)^(k-1) of the pass@k gradient on the step's groups",
    ),
    "adv_abs_mean_correct": (
        "passk_trainer_advantage_abs_mean_correct",
        "Mean |advantage| of the step's correct answers",
    ),
    "adv_abs_mean_wrong": ("passk_trainer_advantage_abs_mean_wrong", "Mean |advantage| of the step's wrong answers"),
}
PHASES = {"waiting_s": "waiting", "rollout_s": "rollout", "train_s": "train", "weight_sync_s": "weight_sync"}


# per task (and task/category, maze size) of the latest step: services/trainer/task_figures.py
TASK_FIGURES = {
    "groups": ("groups", "Groups of the task in the latest step"),
    "reward": ("reward", "Mean reward of the task's samples in the latest step"),
    "pass@k": ("batch_pass_at_k", "Pass@k (the stage's k) of the task's groups in the latest step"),
    "positive": ("positive_fraction", "Share of the task's samples that are correct"),
    "all_wrong": ("all_wrong_fraction", "Share of the task's groups with no correct sample"),
    "all_right": ("all_right_fraction", "Share of the task's groups with only correct samples"),
    "length": ("response_tokens", "Mean response length of the task's samples, in tokens"),
    "alpha_k_mean": ("alpha_k_mean", "Mean weight k(1 - p)^(k-1) of the pass@k gradient on the task's groups"),
    "adv_abs_mean_correct": ("advantage_abs_mean_correct", "Mean |advantage| of the task's correct answers"),
    "adv_abs_mean_wrong": ("advantage_abs_mean_wrong", "Mean |advantage| of the task's wrong answers"),
    "entropy": ("entropy", "Mean token entropy of the policy on the task's graded responses"),
}


class ScrapeCounter:
    """A collector with no metrics that counts the scrapes: the registry collects it on every
    request to /metrics, so a waiter can tell that Prometheus has read the latest values."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = threading.Condition()

    def describe(self) -> list:  # no names: registering it does not collect it
        return []

    def collect(self) -> list:
        with self.changed:
            self.count += 1
            self.changed.notify_all()
        return []

    def wait_past(self, count: int, timeout_s: float) -> bool:
        """Wait until a scrape after the ``count``-th one, at most ``timeout_s``; True if it came."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while self.count <= count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True


class TrainerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.scrapes = ScrapeCounter()
        self.registry.register(self.scrapes)
        self.serving = False
        self.gauges = {key: Gauge(name, text, registry=self.registry) for key, (name, text) in GAUGES.items()}
        self.batch_pass = Gauge("passk_trainer_batch_pass_at_k", "Pass@k of the latest step's groups", ["k"],
                                registry=self.registry)  # fmt: skip
        self.steps = Counter("passk_trainer_steps", "Training steps taken", registry=self.registry)
        self.dropped = Counter("passk_trainer_dropped_stale_groups", "Groups dropped as too stale (async mode)",
                               registry=self.registry)  # fmt: skip
        self.lost_jobs = Counter("passk_trainer_lost_jobs", "Jobs found in no stream (lost by Redis) and scheduled "
                                 "again", registry=self.registry)  # fmt: skip
        self.failed = Counter("passk_trainer_failed_verdicts", "Responses masked out for a failed grading",
                              registry=self.registry)  # fmt: skip
        self.phase = Histogram("passk_trainer_step_phase_seconds", "Step time by phase", ["phase"],
                               registry=self.registry, buckets=(0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000))  # fmt: skip
        self.redis_errors = Counter("passk_trainer_redis_errors", "Failed Redis attempts, retried or not",
                                    registry=self.registry)  # fmt: skip
        self.stream_length = Gauge("passk_trainer_stream_length", "Entries kept in each Redis stream after trimming",
                                   ["stream"], registry=self.registry)  # fmt: skip
        self.eval_pass = Gauge("passk_trainer_eval_pass_at_k", "Held-out pass@k of the latest evaluation",
                               ["row", "k"], registry=self.registry)  # fmt: skip
        self.eta_by_accuracy = Gauge("passk_trainer_eta_by_accuracy", "Mean eta of the latest step's groups by "
                                     "accuracy N_pos/N in eighths", ["bucket"], registry=self.registry)  # fmt: skip
        self.task_figures = {
            figure: Gauge(f"passk_trainer_task_{name}", text, ["task"], registry=self.registry)
            for figure, (name, text) in TASK_FIGURES.items()
        }

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
        self.serving = True

    def linger(self, timeout_s: float) -> bool:
        """Keep serving until one scrape has read the values as they are now (at most
        ``timeout_s``): a run shorter than the scrape interval would otherwise end unseen.
        True when a scrape came, False when nothing is served or none came in time."""
        if not self.serving or timeout_s <= 0:
            return False
        return self.scrapes.wait_past(self.scrapes.count, timeout_s)

    def record_step(self, metrics: dict) -> None:
        for key, gauge in self.gauges.items():
            if isinstance(metrics.get(key), int | float):
                gauge.set(metrics[key])
        for key, value in metrics.items():
            if key.startswith("batch_pass@") and value is not None:
                self.batch_pass.labels(k=key.removeprefix("batch_pass@")).set(value)
        for key, phase in PHASES.items():
            if key in metrics:
                self.phase.labels(phase=phase).observe(metrics[key])
        for stream, length in metrics.get("stream_lengths", {}).items():
            self.stream_length.labels(stream=stream).set(length)
        self.eta_by_accuracy.clear()  # a bucket without groups this step has no value
        for bucket, eta in metrics.get("eta_by_accuracy", {}).items():
            self.eta_by_accuracy.labels(bucket=bucket).set(eta)
        for task, figures in metrics.get("tasks", {}).items():
            for figure, gauge in self.task_figures.items():
                if figures.get(figure) is not None:  # a mean over no answers is None
                    gauge.labels(task=task).set(figures[figure])
        self.steps.inc()
        self.dropped.inc(metrics.get("dropped_stale", 0))
        self.failed.inc(metrics.get("failed_verdicts", 0))

    def record_eval(self, table: dict) -> None:
        for row, entry in table.items():
            for key, value in entry.items():
                if key.startswith("pass@"):
                    self.eval_pass.labels(row=str(row), k=key.removeprefix("pass@")).set(value)
