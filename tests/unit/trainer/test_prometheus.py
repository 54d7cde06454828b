"""The trainer's step and evaluation metrics reach its Prometheus endpoint, over real HTTP."""

import threading

import httpx

from services.common.redis_server import free_port
from services.trainer.prometheus import GAUGES, TrainerMetrics


def test_step_and_eval_metrics_are_served():
    metrics = TrainerMetrics()
    port = free_port()
    metrics.serve("127.0.0.1", port)
    step = {key: 0.25 for key in GAUGES} | {"version": 3, "step": 3, "batch_pass@8": 0.75, "waiting_s": 0.5,
                                            "rollout_s": 2.0, "train_s": 1.0, "weight_sync_s": 0.2,
                                            "dropped_stale": 2, "failed_verdicts": 5, "batch_pass@4": None}  # fmt: skip
    metrics.record_step(step)
    metrics.record_step(step)
    metrics.record_eval({"7x7": {"pass@1": 0.4, "pass@8": 0.9, "items": 100}})
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert "passk_trainer_policy_version 3.0" in text and "passk_trainer_policy_entropy 0.25" in text
    assert 'passk_trainer_batch_pass_at_k{k="8"} 0.75' in text and 'k="4"' not in text
    assert "passk_trainer_steps_total 2.0" in text and "passk_trainer_dropped_stale_groups_total 4.0" in text
    assert "passk_trainer_failed_verdicts_total 10.0" in text
    assert 'passk_trainer_step_phase_seconds_count{phase="rollout"} 2.0' in text
    assert 'passk_trainer_step_phase_seconds_sum{phase="weight_sync"} 0.4' in text
    assert 'passk_trainer_eval_pass_at_k{k="8",row="7x7"} 0.9' in text


def test_linger_ends_with_the_first_full_scrape_after_the_last_step():
    metrics = TrainerMetrics()
    assert metrics.linger(5.0) is False  # nothing served: nothing to wait for
    port = free_port()
    metrics.serve("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}/metrics"
    httpx.get(url)  # a scrape before the last step does not count
    metrics.record_step({"step": 7, "version": 7})
    done: list[bool] = []
    waiter = threading.Thread(target=lambda: done.append(metrics.linger(60.0)))
    waiter.start()
    # a probe reads a filtered page (the deployments' health checks): not a scrape of the values
    probe = httpx.get(url, params={"name[]": "passk_trainer_step"}).text
    assert "passk_trainer_step 7.0" in probe and "passk_trainer_policy_entropy" not in probe
    waiter.join(0.3)
    assert waiter.is_alive() and not done
    assert "passk_trainer_step 7.0" in httpx.get(url).text
    waiter.join(10)
    assert done == [True]
    assert metrics.linger(0.05) is False  # no scrape came in time
