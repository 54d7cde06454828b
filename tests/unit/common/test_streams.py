import logging
import threading
import time

import pytest
import redis

from services.common import streams
from services.common.schemas import PromptJob, RolloutGroup, Sample, SamplingParams
from services.common.streams import (
    StreamConsumer,
    claim_once,
    dead_letter_stream,
    dead_letters,
    publish,
    safe_min_id,
    trim_consumed,
)
from tests.helpers.procs import wait_for


def job(i: int = 0, **overrides) -> PromptJob:
    fields = {
        "job_id": f"job-{i}",
        "prompt_id": f"maze-{i}",
        "task": "maze",
        "policy_version": 0,
        "prompt": "S..\n.*.\n..E\n",
        "reference": "S..\n.*.\n..E",
        "n": 4,
    }
    return PromptJob(**{**fields, **overrides})


def test_publish_read_ack_roundtrip(redis_client):
    consumer = StreamConsumer(redis_client, "prompts", "rollout", "r1", block_ms=10)
    publish(redis_client, "prompts", job(1))
    publish(redis_client, "prompts", job(2))
    assert consumer.backlog()[0] == 2
    [delivery] = consumer.read()
    assert consumer.backlog()[0] == 1
    assert consumer.decode(delivery, PromptJob) == job(1)
    assert consumer.pending() == 1
    consumer.ack(delivery)
    assert consumer.pending() == 0
    [second] = consumer.read()
    consumer.ack(second)
    assert consumer.read() == []


def test_a_dead_consumers_entries_are_claimed_by_another(redis_client):
    dead = StreamConsumer(redis_client, "prompts", "rollout", "dead", claim_idle_ms=50, block_ms=10)
    alive = StreamConsumer(redis_client, "prompts", "rollout", "alive", claim_idle_ms=50, block_ms=10)
    publish(redis_client, "prompts", job(2))
    [taken] = dead.read()  # and never acked
    claimed = []
    for _ in range(1000):  # each read blocks up to 10 ms; the claim comes once the entry idled 50 ms
        claimed = alive.read()
        if claimed:
            break
    assert [d.entry_id for d in claimed] == [taken.entry_id]
    assert claimed[0].deliveries == 2
    assert alive.pending() == 1 and dead_letters(redis_client, "prompts") == []  # still alive, now alive's
    alive.ack(claimed[0])
    assert alive.pending() == 0
    assert alive.read() == [] and dead.read() == []  # acked: nobody gets it again


def test_too_many_deliveries_go_to_the_dead_letters(redis_client):
    consumer = StreamConsumer(redis_client, "prompts", "rollout", "c", claim_idle_ms=0, max_deliveries=2, block_ms=10)
    publish(redis_client, "prompts", job(3))
    consumer.read()  # delivery 1, not acked (a handler that crashes)
    consumer.read()  # delivery 2, reclaimed
    assert consumer.read() == []  # delivery 3 exceeds the limit
    [dead] = dead_letters(redis_client, "prompts")
    assert "delivered 3 times (max 2)" in dead["reason"]
    assert consumer.pending() == 0


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "invalid PromptJob"),
        (b'{"job_id": "x"}', "prompt_id: Field required"),
        (job(4).model_dump_json().replace('"n":4', '"n":"four"').encode(), "n: Input should be a valid integer"),
        (
            job(4).model_dump_json().replace('"n":4', '"n":4,"extra":1').encode(),
            "extra: Extra inputs are not permitted",
        ),
        (job(4).model_dump_json().replace('"job-4"', '"bad id!"').encode(), "job_id: String should match pattern"),
    ],
)
def test_malformed_messages_are_dead_lettered_with_the_reason(redis_client, payload, reason):
    consumer = StreamConsumer(redis_client, "prompts", "rollout", "c", block_ms=10)
    redis_client.xadd("prompts", {"data": payload})
    [delivery] = consumer.read()
    assert consumer.decode(delivery, PromptJob) is None
    [dead] = dead_letters(redis_client, "prompts")
    assert reason in dead["reason"], dead["reason"]
    assert dead["data"] == payload.decode()
    assert consumer.pending() == 0


def test_an_entry_without_data_is_dead_lettered(redis_client):
    consumer = StreamConsumer(redis_client, "prompts", "rollout", "c", block_ms=10)
    redis_client.xadd("prompts", {"other": "x"})
    [delivery] = consumer.read()
    assert consumer.decode(delivery, PromptJob) is None
    assert "no 'data' field" in dead_letters(redis_client, "prompts")[0]["reason"]


def test_claim_once_is_the_dedupe_guard(redis_client):
    assert claim_once(redis_client, "job-1:0")
    assert not claim_once(redis_client, "job-1:0")
    assert claim_once(redis_client, "job-1:1")


def test_schema_cross_checks():
    sample = Sample(text="UR", token_ids=[1, 2], logprobs=[-0.1, -0.2])
    with pytest.raises(ValueError, match="asked for 4 samples, group has 1"):
        RolloutGroup(job=job(5), policy_version=0, prompt_token_ids=[1], samples=[sample], replica="r1")
    with pytest.raises(ValueError, match="differ in length"):
        Sample(text="U", token_ids=[1, 2], logprobs=[-0.1])
    with pytest.raises(ValueError, match="less than or equal to 1"):
        SamplingParams(top_p=1.5)


def test_stop_strings_are_bounded():
    from pydantic import ValidationError

    from services.common.schemas import SamplingParams

    assert SamplingParams(stop=("</answer>",)).stop == ("</answer>",)
    with pytest.raises(ValidationError, match="1 to 256 characters"):
        SamplingParams(stop=("",))
    with pytest.raises(ValidationError, match="at most 8 items"):
        SamplingParams(stop=tuple("abcdefghi"))


def test_trimming_drops_only_what_every_group_is_done_with(redis_client):
    ids = [publish(redis_client, "s", job(i)) for i in range(10)]
    first = StreamConsumer(redis_client, "s", "g1", "c", claim_idle_ms=10)
    second = StreamConsumer(redis_client, "s", "g2", "c", claim_idle_ms=10)
    assert trim_consumed(redis_client, "s") == 0  # neither group has been given anything
    got = first.read(6)
    for delivery in got[:2] + got[3:]:
        first.ack(delivery)  # entry 2 stays pending: its consumer may have died
    for delivery in second.read(8):
        second.ack(delivery)
    assert safe_min_id(redis_client, "s") == ids[2]
    assert trim_consumed(redis_client, "s") == 2
    kept = [eid.decode() for eid, _ in redis_client.xrange("s")]
    assert kept == ids[2:]
    # the pending entry is still there to be claimed and finished, and g1's unread entries to be read
    time.sleep(0.02)
    (claimed,) = first.read(1)
    assert claimed.entry_id == ids[2] and claimed.deliveries == 2
    first.ack(claimed)
    assert [d.entry_id for d in first.read(10)] == ids[6:]


def test_a_group_that_read_everything_lets_the_stream_empty(redis_client):
    for i in range(3):
        publish(redis_client, "s", job(i))
    consumer = StreamConsumer(redis_client, "s", "g", "c")
    for delivery in consumer.read(3):
        consumer.ack(delivery)
    assert trim_consumed(redis_client, "s") == 3 and redis_client.xlen("s") == 0
    publish(redis_client, "s", job(3))  # new work after a trim is read as usual
    assert len(consumer.read(5)) == 1


def test_dead_letters_keep_the_newest_few(redis_client, monkeypatch):
    monkeypatch.setattr(streams, "DEAD_LETTERS_KEPT", 2)
    consumer = StreamConsumer(redis_client, "s", "g", "c")
    ids = [publish(redis_client, "s", job(i)) for i in range(3)]
    for delivery in consumer.read(3):
        consumer.dead_letter(delivery, "test")
    kept = [fields[b"entry_id"].decode() for _, fields in redis_client.xrange(dead_letter_stream("s"))]
    assert kept == ids[1:]
    assert trim_consumed(redis_client, "s") == 3  # dead-lettered entries are acked: done with


def test_trimming_keeps_the_newest_few_consumed_entries(redis_client):
    ids = [publish(redis_client, "s", job(i)) for i in range(6)]
    consumer = StreamConsumer(redis_client, "s", "g", "c")
    for delivery in consumer.read(6):
        consumer.ack(delivery)
    assert trim_consumed(redis_client, "s", keep=10) == 0  # fewer than kept
    assert trim_consumed(redis_client, "s", keep=2) == 4
    assert [eid.decode() for eid, _ in redis_client.xrange("s")] == ids[4:]


def test_a_vanishing_temperature_is_greedy():
    assert SamplingParams(temperature=6.6e-75).temperature == 0.0
    assert SamplingParams(temperature=1e-5).temperature == 1e-5
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1e-9)


def test_seeds_fit_a_signed_64_bit_generator():
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1
    with pytest.raises(ValueError):
        SamplingParams(seed=2**64)


def test_a_dedupe_key_lasts_a_week_under_its_own_name(redis_client):
    assert claim_once(redis_client, "job-9:3:1")
    assert 7 * 24 * 3600 - 5 <= redis_client.ttl("passk:dedupe:job-9:3:1") <= 7 * 24 * 3600
    assert claim_once(redis_client, "job-9:3:2", ttl_s=60) and redis_client.ttl("passk:dedupe:job-9:3:2") <= 60


def test_a_dead_letter_keeps_the_entry_the_consumer_and_a_bounded_reason(redis_client):
    deaths = []
    consumer = StreamConsumer(redis_client, "s", "g", "worker-7", block_ms=10, on_dead_letter=lambda: deaths.append(1))
    eid = publish(redis_client, "s", job(1))
    [delivery] = consumer.read()
    consumer.dead_letter(delivery, "x" * 5000)
    [dead] = dead_letters(redis_client, "s")
    assert (dead["entry_id"], dead["consumer"], dead["reason"]) == (eid, "worker-7", "x" * 2000)
    assert dead["data"] == job(1).model_dump_json() and deaths == [1]
    assert consumer.pending() == 0  # dead-lettered means acked
    redis_client.xadd("s", {"other": "x"})
    [bare] = consumer.read()
    assert consumer.decode(bare, PromptJob) is None
    assert dead_letters(redis_client, "s")[1]["reason"] == "entry has no 'data' field"
    assert dead_letters(redis_client, "s")[1]["data"] == ""


def test_the_default_limit_is_five_deliveries(redis_client):
    claims, deaths = [], []
    consumer = StreamConsumer(redis_client, "s", "g", "c", claim_idle_ms=0, block_ms=10,
                              on_claim=lambda: claims.append(1), on_dead_letter=lambda: deaths.append(1))  # fmt: skip
    publish(redis_client, "s", job(2))
    seen = [d.deliveries for _ in range(5) for d in consumer.read()]  # delivered, never acked
    assert seen == [1, 2, 3, 4, 5] and len(claims) == 4 and deaths == []
    assert consumer.read() == [] and deaths == [1]  # the sixth delivery is the dead letters'
    assert "delivered 6 times (max 5)" in dead_letters(redis_client, "s")[0]["reason"]


def test_trimming_stops_right_after_the_last_delivered_entry_of_the_same_millisecond(redis_client):
    for seq in range(3):
        redis_client.xadd("s", {"data": job(seq).model_dump_json()}, id=f"5-{seq}")
    consumer = StreamConsumer(redis_client, "s", "g", "c", block_ms=10)
    for delivery in consumer.read(2):
        consumer.ack(delivery)
    assert consumer.backlog() == (1, 0)
    assert safe_min_id(redis_client, "s") == "5-2"
    assert trim_consumed(redis_client, "s") == 2
    [left] = consumer.read(5)
    assert left.entry_id == "5-2"  # never trimmed: it had not been delivered
    assert consumer.backlog() == (0, 1)


def test_a_vanished_group_is_made_again_and_other_errors_are_raised(redis_client, caplog):
    consumer = StreamConsumer(redis_client, "s", "g", "c", block_ms=10)
    redis_client.delete("s")  # the stream and its group are gone (Redis restarted without its data)
    with caplog.at_level(logging.WARNING, logger="services.common.streams"):
        assert consumer.read() == []
    assert any(m.startswith("s: group g is gone (NOGROUP") and m.endswith("creating it again") for m in caplog.messages)
    publish(redis_client, "s", job(1))
    [delivery] = consumer.read()
    assert consumer.decode(delivery, PromptJob) == job(1)
    redis_client.delete("s")
    redis_client.set("s", "not a stream")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        consumer.read()


def test_a_read_blocks_until_an_entry_comes(redis_client):
    consumer = StreamConsumer(redis_client, "s", "g", "c", block_ms=60_000)
    got = []
    reader = threading.Thread(target=lambda: got.extend(consumer.read()))
    reader.start()
    wait_for(lambda: int(redis_client.info("clients")["blocked_clients"]) >= 1, 30)  # it waits in XREADGROUP
    publish(redis_client, "s", job(3))
    reader.join(30)
    assert [consumer.decode(d, PromptJob) for d in got] == [job(3)]


def test_claims_take_at_most_count_and_skip_entries_deleted_while_pending(redis_client, caplog):
    dead = StreamConsumer(redis_client, "s", "g", "dead", block_ms=10)
    alive = StreamConsumer(redis_client, "s", "g", "alive", claim_idle_ms=0, block_ms=10)
    ids = [publish(redis_client, "s", job(i)) for i in range(4)]
    taken = dead.read(4)  # never acked
    redis_client.xdel("s", ids[0])  # gone while pending
    with caplog.at_level(logging.WARNING, logger="services.common.streams"):
        assert alive.read(1) == []  # the deleted entry: dropped from the pending list by Redis (>= 7.0)
        first = alive.read(1)
    assert [d.entry_id for d in first] == [ids[1]]  # one claimed, as asked
    assert first[0].payload == taken[1].payload and first[0].deliveries == 2
    assert f"claimed {ids[1]} from a dead consumer (delivery 2)" in caplog.messages
    assert [d.entry_id for d in alive.read(5)] == ids[1:]  # the rest, and ids[1] again (not acked yet)
    pending = redis_client.xpending_range("s", "g", min="-", max="+", count=10)
    assert ids[0].encode() not in {p["message_id"] for p in pending}  # the deleted entry is no one's


def test_entries_over_the_limit_all_go_to_the_dead_letters(redis_client):
    consumer = StreamConsumer(redis_client, "s", "g", "c", claim_idle_ms=0, max_deliveries=1, block_ms=10)
    ids = [publish(redis_client, "s", job(i)) for i in range(3)]
    consumer.read(3)  # delivery 1 of each, never acked
    assert consumer.read(3) == []  # each of the three is over the limit
    assert [d["entry_id"] for d in dead_letters(redis_client, "s")] == ids


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"[]", "invalid PromptJob: <root>: Input should be an object"),
        (
            job(4).model_dump_json().replace('"temperature":1.0', '"temperature":"hot"').encode(),
            "invalid PromptJob: sampling.temperature: Input should be a valid number, "
            "unable to parse string as a number",
        ),
        (
            b"{}",  # seven fields missing: the first five are named
            "invalid PromptJob: job_id: Field required; prompt_id: Field required; task: Field required; "
            "policy_version: Field required; prompt: Field required",
        ),
    ],
)
def test_a_dead_letter_reason_names_each_field(redis_client, payload, reason):
    consumer = StreamConsumer(redis_client, "s", "g", "c", block_ms=10)
    redis_client.xadd("s", {"data": payload})
    [delivery] = consumer.read()
    assert consumer.decode(delivery, PromptJob) is None
    assert dead_letters(redis_client, "s")[0]["reason"] == reason


def test_dead_letters_are_read_back_with_their_ids_and_bad_bytes_replaced(redis_client, caplog):
    consumer = StreamConsumer(redis_client, "s", "g", "c", block_ms=10)
    redis_client.xadd("s", {"data": b"\xff\xfe not utf-8"})
    [delivery] = consumer.read()
    with caplog.at_level(logging.ERROR, logger="services.common.streams"):
        consumer.dead_letter(delivery, "why")
    assert caplog.messages == [f"dead-lettered {delivery.entry_id} from s: why"]
    [dead] = dead_letters(redis_client, "s")
    [(dead_id, _)] = redis_client.xrange(dead_letter_stream("s"))
    assert dead["dead_id"] == dead_id.decode() and dead["data"] == "\ufffd\ufffd not utf-8"


def test_the_defaults_are_the_documented_ones(redis_client):
    """Claimed after 30 s idle, reads block up to 1 s, dead letters after 5 deliveries."""
    consumer = StreamConsumer(redis_client, "s", "g", "c")
    assert (consumer.claim_idle_ms, consumer.block_ms, consumer.max_deliveries) == (30_000, 1000, 5)


def test_the_backlog_of_a_group_that_is_gone_is_empty(redis_client):
    consumer = StreamConsumer(redis_client, "s", "g", "c", block_ms=10)
    publish(redis_client, "s", job(1))
    consumer.read()
    assert consumer.backlog() == (0, 1)
    redis_client.xgroup_destroy("s", "g")
    assert consumer.backlog() == (0, 0)


def test_trimming_compares_ids_as_numbers(redis_client):
    for ms in (9, 10, 11):
        redis_client.xadd("s", {"data": job(ms).model_dump_json()}, id=f"{ms}-0")
    slow = StreamConsumer(redis_client, "s", "slow", "c", block_ms=10)
    fast = StreamConsumer(redis_client, "s", "fast", "c", block_ms=10)
    slow.ack(*slow.read(1))  # 9-0
    for delivery in fast.read(3):
        fast.ack(delivery)
    assert safe_min_id(redis_client, "s") == "9-1"  # "11-1" < "9-1" as text
    assert trim_consumed(redis_client, "s") == 1 and [e.decode() for e, _ in redis_client.xrange("s")] == [
        "10-0",
        "11-0",
    ]


def test_trimming_a_stream_nobody_reads_drops_nothing(redis_client):
    publish(redis_client, "s", job(1))
    assert trim_consumed(redis_client, "s") == 0 and redis_client.xlen("s") == 1


def test_trimming_keeps_exactly_the_newest_few(redis_client):
    ids = [publish(redis_client, "s", job(i)) for i in range(6)]
    consumer = StreamConsumer(redis_client, "s", "g", "c", block_ms=10)
    for delivery in consumer.read(6):
        consumer.ack(delivery)
    assert trim_consumed(redis_client, "s", keep=3) == 3
    assert [e.decode() for e, _ in redis_client.xrange("s")] == ids[3:]
