"""The Gateway's batched hops (services/gateway/links.py) and a replica's outboxes (services/replica/outbox.py), against
stand-in services that record what they are called with: ticks, order, pacing, acknowledgements and
failures. The real services behind them are tested end to end in test_local_gateway.py and
test_ray_services.py."""

from __future__ import annotations

import asyncio
import time

import torch

from liveserve.services.wire import contracts as c
from liveserve.services.gateway.links import FrameBatcher, ReplicaLink
from liveserve.services.replica.outbox import Outboxes
from liveserve.services.reaction.service import merge_deltas


def frame(session: str, frame_id: int) -> c.FrameImage:
    return c.FrameImage(session, frame_id, frame_id * 0.5, b"jpeg")


class SlowPerception:
    """Encodes after `delay_s`; records each call's frames and how many calls were in flight at once."""

    def __init__(self, delay_s: float = 0.0, fail: bool | int = False) -> None:
        """`fail`: True fails every call, a number that many calls first."""
        self.delay_s, self.fail = delay_s, fail
        self.calls: list[list[int]] = []
        self.in_flight = self.most_in_flight = 0

    async def encode(self, request: c.EncodeRequest) -> c.EncodeResult:
        self.calls.append([f.frame_id for f in request.frames])
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail is True or (self.fail and len(self.calls) <= self.fail):
                raise RuntimeError("tower on fire")
        finally:
            self.in_flight -= 1
        rows = tuple(torch.zeros(2, 3) for _ in request.frames)
        return c.EncodeResult(rows, tuple("" for _ in request.frames), self.delay_s)


def run_batcher(perception, script, *, senders: int = 99, tick_s: float = 0.02, max_frames: int = 8,
                max_calls: int = 4, attempts: int = 3):
    """Feed (delay before, frame) pairs to a FrameBatcher; returns what came back: (frame ids, error)."""
    done: list[tuple[list[int], str]] = []

    async def main():
        batcher = FrameBatcher(perception, tick_s=tick_s, max_frames=max_frames, timeout_s=5,
                               done=lambda batch, result, error: done.append(([f.frame_id for f, _ in batch], error)),
                               senders=lambda: senders, max_calls=max_calls, attempts=attempts)
        for delay, item in script:
            await asyncio.sleep(delay)
            batcher.add(item, owner=item.session_id)
        deadline = time.monotonic() + 5
        while sum(len(ids) for ids, _ in done) < len(script) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        batcher.close()

    asyncio.run(main())
    return done


def test_frames_of_one_tick_go_in_one_call_and_a_lone_frame_waits_at_most_a_tick():
    perception = SlowPerception()
    started = time.monotonic()
    run_batcher(perception, [(0, frame("a", 0)), (0, frame("b", 0)), (0, frame("c", 0))], tick_s=0.05)
    assert perception.calls == [[0, 0, 0]] and time.monotonic() - started < 1.0


def test_a_batch_goes_at_once_when_every_open_session_has_a_frame_in_it():
    perception = SlowPerception()
    started = time.monotonic()
    run_batcher(perception, [(0, frame("a", 0)), (0, frame("b", 1))], senders=2, tick_s=10.0)
    assert perception.calls == [[0, 1]] and time.monotonic() - started < 2.0  # not the 10 s tick


def test_calls_in_flight_are_bounded_and_later_frames_wait_for_fuller_batches():
    perception = SlowPerception(delay_s=0.05)
    script = [(0.002, frame("s", i)) for i in range(20)]
    done = run_batcher(perception, script, tick_s=0.0, max_frames=4, max_calls=2)
    assert perception.most_in_flight == 2
    assert sorted(i for ids, _ in done for i in ids) == list(range(20))
    assert len(perception.calls) < 20 and max(len(call) for call in perception.calls) > 1  # batched while busy
    assert all(len(call) <= 4 for call in perception.calls)


def test_a_failed_call_reports_every_frame_in_it_after_its_retries():
    perception = SlowPerception(fail=True)
    done = run_batcher(perception, [(0, frame("a", 0)), (0, frame("b", 1))], senders=2)
    assert done == [([0, 1], "encoding failed: RuntimeError")] and perception.calls == [[0, 1]] * 3


def test_a_call_that_fails_once_is_tried_again_and_its_frames_come_back():
    """A Perception replica died under the call: the pool routes the next try to another one."""
    perception = SlowPerception(fail=1)
    done = run_batcher(perception, [(0, frame("a", 0)), (0, frame("b", 1))], senders=2)
    assert done == [([0, 1], "")] and perception.calls == [[0, 1], [0, 1]]


class Replica:
    """A stand-in Decision replica: records pushes, answers each after `delay_s`, streams given events."""

    def __init__(self, delay_s: float = 0.0, fail_push: bool = False) -> None:
        self.delay_s, self.fail_push = delay_s, fail_push
        self.pushes: list[tuple[str, tuple]] = []
        self.at: list[float] = []
        self.outbox: asyncio.Queue = asyncio.Queue()

    async def push(self, replica: str, push: c.DecisionPush) -> None:
        self.at.append(time.monotonic())
        await asyncio.sleep(self.delay_s)
        if self.fail_push:
            raise ConnectionError("replica gone")
        self.pushes.append((replica, push.commands))

    async def events(self, replica: str, gateway_id: str):
        while (batch := await self.outbox.get()) is not None:
            yield batch


def close(session: str) -> c.CloseSession:
    return c.CloseSession(session, 1, True)


def test_commands_sent_while_a_push_is_in_flight_go_together_in_order_and_acks_follow_the_push():
    async def main():
        replica, seen, failures = Replica(delay_s=0.05), [], []
        link = ReplicaLink(replica, "r1", "g", make_push=c.DecisionPush, dispatch=seen.append,
                           failed=lambda _, why: failures.append(why), timeout_s=5)
        link.send(close("a"))
        await asyncio.sleep(0.01)  # the first push is in flight now
        link.send(close("b"))
        ack = link.send_acknowledged(close("c"))
        assert not ack.done()
        assert await asyncio.wait_for(ack, 5) is True
        await replica.outbox.put(c.EventBatch((c.SessionClosed("a"),)))
        await asyncio.sleep(0.01)
        link.close()
        return replica, seen, failures

    replica, seen, failures = asyncio.run(main())
    assert [[cmd.session_id for cmd in commands] for _, commands in replica.pushes] == [["a"], ["b", "c"]]
    assert {r for r, _ in replica.pushes} == {"r1"} and seen == [c.SessionClosed("a")] and not failures


def test_a_busy_link_pushes_at_most_once_per_interval_and_an_idle_one_at_once():
    async def main():
        replica = Replica()
        link = ReplicaLink(replica, "r1", "g", make_push=c.DecisionPush, dispatch=lambda e: None,
                           failed=lambda *_: None, timeout_s=5, interval_s=0.05)
        started = time.monotonic()
        for i in range(5):
            await link.send_acknowledged(close(f"s{i}"))
        link.close()
        return replica, started

    replica, started = asyncio.run(main())
    assert replica.at[0] - started < 0.04  # idle: at once
    assert all(b - a >= 0.045 for a, b in zip(replica.at, replica.at[1:]))


def test_a_failing_replica_fails_the_link_once_and_resolves_its_acks():
    async def main():
        failures = []
        link = ReplicaLink(Replica(fail_push=True), "r1", "g", make_push=c.DecisionPush, dispatch=lambda e: None,
                           failed=lambda failed, why: failures.append((failed.replica, why)), timeout_s=5)
        ack = link.send_acknowledged(close("a"))
        assert await asyncio.wait_for(ack, 5) is False
        link.send(close("b"))  # ignored once closed
        return failures, link.closed

    failures, closed = asyncio.run(main())
    assert closed and failures == [("r1", "the session's replica replica failed (ConnectionError)")]


def test_an_outbox_batches_a_busy_stream_and_forgets_a_gateway_that_left():
    async def main():
        gone: list[str] = []
        boxes = Outboxes(gone.append, interval_s=0.05)
        stream = boxes.stream("g")
        boxes.put("g", 1)
        first = await anext(stream)  # idle: at once
        for item in (2, 3, 4):
            boxes.put("g", item)
            await asyncio.sleep(0.005)
        second = await anext(stream)  # busy: what collected in the interval, together
        await stream.aclose()
        boxes.put("g", 5)  # nobody will read it: dropped, not kept
        return first, second, gone, boxes._boxes

    first, second, gone, remaining = asyncio.run(main())
    assert first.events == (1,) and second.events == (2, 3, 4) and gone == ["g"] and not remaining


def test_reply_deltas_of_one_session_merge_across_other_sessions_events():
    events = [c.ResponseDelta("a", "he", 1), c.ResponseDelta("b", "x", 1), c.ResponseDelta("a", "llo", 2),
              c.ResponseDone("b", "x", 1, "eos", 0.1, 0.1), c.ResponseDelta("a", "!", 1), c.ResponseDelta("b", "y", 1)]
    assert merge_deltas(events) == [c.ResponseDelta("a", "hello!", 4), c.ResponseDelta("b", "x", 1),
                                    c.ResponseDone("b", "x", 1, "eos", 0.1, 0.1), c.ResponseDelta("b", "y", 1)]
