"""Async mode's staleness bound, through a real Redis: a scored group from too many versions back is
dropped, counted, and its job generated again with the same prompt and seed; groups within the bound
are trained on; a group from another epoch is skipped; the batch keeps the jobs' order."""

import threading

from services.common.config import StreamNames
from services.common.schemas import PromptJob, RolloutGroup, Sample, ScoredGroup, Verdict
from services.common.streams import publish
from services.trainer.config import TrainerSettings
from services.trainer.loop import Trainer
from tests.helpers.cluster import maze_data
from tests.helpers.procs import wait_for

STREAMS = StreamNames()


def scored(job: PromptJob, version: int, epoch: int) -> ScoredGroup:
    samples = [Sample(text="x", token_ids=[5], logprobs=[-1.0]) for _ in range(job.n)]
    group = RolloutGroup(job=job, policy_version=version, policy_epoch=epoch, prompt_token_ids=[4], samples=samples,
                         replica="r0")  # fmt: skip
    return ScoredGroup(group=group, verdicts=[Verdict(reward=0.0, status="wrong", grader="maze", elapsed=0.0)] * job.n)


def test_a_too_stale_group_is_dropped_and_its_job_generated_again(redis_server, tiny_model, tmp_path):
    client = redis_server.client
    client.flushdb()
    maze_data(tmp_path, test_per_size=2, seed=2)
    settings = TrainerSettings(
        model_dir=str(tiny_model), run_dir=str(tmp_path / "run"), train_data=str(tmp_path / "train.jsonl"),
        test_data=str(tmp_path / "test.jsonl"), redis_url=redis_server.url, mode="async", max_staleness=1,
        n_rollout=4, k=2, prompts_per_step=3, group_timeout_s=60,
    )  # fmt: skip
    trainer = Trainer(settings)
    trainer.version = 5
    jobs = trainer.schedule(6)
    epoch = trainer.epoch
    result = {}
    collecting = threading.Thread(target=lambda: result.update(zip(("groups", "waited", "dropped"),
                                                                    trainer.collect(jobs), strict=True)))  # fmt: skip
    collecting.start()
    publish(client, STREAMS.scored, scored(jobs[0], 3, epoch))  # two versions back: too stale
    publish(client, STREAMS.scored, scored(jobs[1], 4, epoch))  # one back: within the bound
    publish(client, STREAMS.scored, scored(jobs[2], 5, epoch - 1))  # another trainer run's epoch: foreign

    def retry() -> PromptJob | None:
        queued = [PromptJob.model_validate_json(f[b"data"]) for _, f in client.xrange(STREAMS.prompts)]
        return next((j for j in queued if j.job_id.startswith(f"{jobs[0].job_id}-r")), None)

    again = wait_for(retry, 30)
    assert (again.prompt, again.sampling.seed, again.policy_version) == (jobs[0].prompt, jobs[0].sampling.seed, 5)
    publish(client, STREAMS.scored, scored(again, 5, epoch))
    publish(client, STREAMS.scored, scored(jobs[2], 5, epoch))
    collecting.join(60)
    assert not collecting.is_alive()
    groups = result["groups"]
    assert [g.group.job.job_id for g in groups] == [again.job_id, jobs[1].job_id, jobs[2].job_id]
    assert [g.group.policy_version for g in groups] == [5, 4, 5] and result["dropped"] == 1
    # the foreign group came first for jobs[2], with the same version: only its epoch gives it away
    assert [g.group.policy_epoch for g in groups] == [epoch] * 3
    trainer.metrics_file.close()
