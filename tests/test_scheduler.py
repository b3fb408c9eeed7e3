"""Continuous batching (dreamcore/scheduler.py) against the one engine run alone (TextEngine.continue_batch).

In-process, stepping the scheduler by hand so requests join and leave at chosen steps; one test
drives the LLMServer deployment on the session's Ray.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _model_helpers import COLOURS, debug_model, dreaming_model, one_thread, solid_image  # noqa: F401 (fixture)

from dreamcore.engine import Drawn, TextEngine, TextRequest, TextResult
from dreamcore.generate import Document, GenerationParams, dream_requests
from dreamcore.scheduler import CacheFullError, Scheduler, Ticket, TokenEvent

pytestmark = pytest.mark.usefixtures("one_thread")


def _engine(dream_bias: float) -> TextEngine:
    """The debug model with a bias on <dream_start> in its LM head, so an untrained model draws."""
    return TextEngine(*dreaming_model(dream_bias))


@pytest.fixture(scope="module")
def talker() -> TextEngine:
    """Draws now and then: documents have text between their images."""
    return _engine(3.0)


@pytest.fixture(scope="module")
def dreamer() -> TextEngine:
    """Draws at once while it may: text comes only after the last image."""
    return _engine(40.0)


def _image(k: int):
    """The image 'drawn' for a document's k-th dream (the text side is under test, not the decoder)."""
    return solid_image(COLOURS[k % len(COLOURS)], 16)


def alone(engine: TextEngine, prompt: list, params: GenerationParams) -> list[TextResult]:
    """Every text round of the document, each continued alone by continue_batch."""
    doc, rounds = Document(prompt, params), []
    while not doc.finished:
        rounds.append(engine.continue_batch([doc.text_request()])[0])
        doc.add_text(rounds[-1])
        if doc.wants_image:
            doc.add_image(_image(doc.images))
    return rounds


class DocDriver:
    """Drives one Document over the scheduler: submits the next round when the last one returned."""

    def __init__(self, s: Scheduler, session: str, prompt: list, params: GenerationParams) -> None:
        self.s, self.session, self.doc = s, session, Document(prompt, params)
        self.rounds: list[TextResult] = []
        self.ticket: Ticket | None = s.submit(self.doc.text_request(), session)

    def poll(self) -> None:
        if self.ticket is None or not self.ticket.done:
            return
        self.rounds.append(self.ticket.result)
        self.doc.add_text(self.ticket.result)
        if self.doc.wants_image:
            self.doc.add_image(_image(self.doc.images))
        self.ticket = None if self.doc.finished else self.s.submit(self.doc.text_request(), self.session)


def run(s: Scheduler, joins: dict[int, Callable[[], None]], drivers: list[DocDriver], tickets: list[Ticket],
        max_steps: int = 2000) -> None:
    for step in range(max_steps):
        if step in joins:
            joins[step]()
        for d in drivers:
            d.poll()
        if step > max(joins, default=0) and all(d.ticket is None for d in drivers) and all(t.done for t in tickets):
            return
        s.step()
    raise AssertionError("the scheduler did not finish its requests")


def assert_same(got: TextResult, want: TextResult) -> None:
    assert got.token_ids == want.token_ids and got.text == want.text
    assert (got.stop, got.prompt_tokens, got.new_tokens, got.error) == (want.stop, want.prompt_tokens,
                                                                        want.new_tokens, want.error)
    assert (got.cond is None) == (want.cond is None)
    if want.cond is not None:
        np.testing.assert_allclose(got.cond, want.cond, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got.uncond, want.uncond)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_documents_under_continuous_batching_equal_documents_alone(talker, temperature):
    engine = talker
    docs = [(["a red circle"], GenerationParams(24, 3, temperature, 0.9, seed=5)),
            ([_image(3), "here is a picture"], GenerationParams(20, 2, temperature, 1.0, seed=8))]
    others = [
        TextRequest(["two yellow squares next to a blue circle and more"], 12, temperature, seed=9),
        TextRequest([_image(1), "what is this"], 5, temperature, 0.95, seed=2, allow_dream=False),
        dream_requests(["a blue square"], seed=3)[0],  # force_dream: conditions straight from the prefill
        TextRequest(["circle " * 400], 4),  # too long: fails alone, at once
        TextRequest(["a", Drawn(_image(2)), "b"], 3, temperature, seed=4),
        TextRequest(["a"], 0),  # no budget: "length" without sampling
    ]
    want_docs = [alone(engine, p, params) for p, params in docs]
    want_others = [engine.continue_batch([r])[0] for r in others]
    assert all(len(w) >= 2 for w in want_docs)  # every document comes back after an image
    if temperature > 0:  # text before an image: the next round re-tokenizes it (the cache is cropped there)
        assert any(r.token_ids for w in want_docs for r in w[:-1])

    s = Scheduler(engine, max_batch_size=3)  # fewer slots than requests: some wait, then join
    drivers: list[DocDriver] = []
    tickets: list[Ticket] = []
    joins = {0: lambda: drivers.append(DocDriver(s, "doc-a", *docs[0])),
             1: lambda: tickets.append(s.submit(others[0])),
             2: lambda: tickets.append(s.submit(others[1])),
             3: lambda: drivers.append(DocDriver(s, "doc-b", *docs[1])),
             5: lambda: tickets.extend(s.submit(r) for r in others[2:4]),
             9: lambda: tickets.extend(s.submit(r) for r in others[4:])}
    run(s, joins, drivers, tickets)

    for d, want in zip(drivers, want_docs):
        assert len(d.rounds) == len(want)
        for got, w in zip(d.rounds, want):
            assert_same(got, w)
    for t, w in zip(tickets, want_others):
        assert_same(t.result, w)
    assert tickets[3].result.too_long and "shorten the prompt" in tickets[3].result.error
    assert max(s.batch_sizes) == 3  # rows really shared decode steps
    assert s.sessions == 0 and s.reserved_tokens == 0 and s.running == 0  # finished documents free everything


def test_three_image_document_prefills_each_token_once(dreamer):
    engine = dreamer
    params = GenerationParams(max_new_tokens=12, max_images=3, temperature=1.0, top_p=1.0, seed=1)
    s = Scheduler(engine, max_batch_size=2)
    d = DocDriver(s, "doc", ["a red circle"], params)
    per_round = []
    while d.ticket is not None:
        before = s.prefill_tokens
        while not d.ticket.done:
            s.step()
        per_round.append(s.prefill_tokens - before)
        d.poll()
    assert [r.stop for r in d.rounds] == ["dream"] * 3 + [d.rounds[-1].stop] and d.doc.images == 3
    last = d.rounds[-1]
    # Every position of the document ran through the model once: prefill (prompt, dream queries,
    # image blocks) or a decode step (sampled text; the last sampled token is never fed back).
    assert s.prefill_tokens + s.decode_tokens == last.prompt_tokens + last.new_tokens - 1
    q, block = engine.tok.num_dream_queries, engine.tok.image_block_len
    prompt = len(engine.layout(["a red circle"]))
    # Round 1: the prompt, then <dream_start> + queries; rounds 2-3: <dream_end> + the comprehension
    # block, then the next dream; round 4: <dream_end> + the block only.
    assert per_round == [prompt + 1 + q, 1 + block + 1 + q, 1 + block + 1 + q, 1 + block]
    assert sum(r.prompt_tokens for r in d.rounds) > 2 * s.prefill_tokens  # what re-prefilling would cost
    np.testing.assert_allclose(d.rounds[2].cond, alone(engine, ["a red circle"], params)[2].cond, atol=1e-5, rtol=0)


def test_a_full_cache_evicts_parked_sessions_then_refuses(dreamer):
    engine = dreamer
    s = Scheduler(engine, max_batch_size=4, max_cache_tokens=engine.max_len, retry_after_s=3.0)
    parked = s.submit(TextRequest(["a red circle"], 4, seed=1), "parked")
    while not parked.done:
        s.step()
    assert parked.result.stop == "dream" and s.sessions == 1
    held = s.reserved_tokens
    assert held == len(engine.layout(["a red circle"])) + 1 + engine.tok.num_dream_queries
    big = TextRequest(["two yellow squares"], 110, seed=2, allow_dream=False)
    first = s.submit(big)  # needs more than is free: the parked session is evicted, not the request refused
    assert s.sessions == 0 and s.reserved_tokens == len(engine.layout(["two yellow squares"])) + 110
    with pytest.raises(CacheFullError, match="KV cache is full") as e:
        s.submit(big)
    assert e.value.retry_after_s == 3.0
    while not first.done:
        s.step()
    assert s.reserved_tokens == 0
    s.submit(big)  # room again


def test_cancel_frees_the_slot_and_the_cache_at_once(talker):
    engine = talker
    s = Scheduler(engine, max_batch_size=1)
    long = s.submit(TextRequest(["a red circle"], 60, seed=1, allow_dream=False), "c")
    waiting = s.submit(TextRequest(["a blue square"], 3, 0.0, allow_dream=False))
    busy = s.submit(TextRequest(["x"], 3), "c")
    assert "round in flight" in busy.result.error
    for _ in range(3):
        s.step()
    assert s.running == 1 and s.waiting == 1 and not long.done
    reserved = s.reserved_tokens
    assert s.cancel("c") and s.reserved_tokens < reserved and s.sessions == 0  # released at once
    s.step()  # the next step drops the row; the waiting request takes the slot
    assert long.result.error == "the request was cancelled"
    assert s.running == 1 and s.waiting == 0
    while not waiting.done:
        s.step()
    assert_same(waiting.result, engine.continue_batch([TextRequest(["a blue square"], 3, 0.0, allow_dream=False)])[0])
    assert not s.cancel("c") and s.reserved_tokens == 0


def test_sessions_expire_and_a_lost_cache_costs_only_a_prefill(dreamer):
    engine, now = dreamer, [0.0]
    s = Scheduler(engine, session_ttl_s=10.0, clock=lambda: now[0])
    params = GenerationParams(max_new_tokens=8, max_images=1, temperature=1.0, seed=3)
    d = DocDriver(s, "doc", ["a red circle"], params)
    while not d.ticket.done:
        s.step()
    d.poll()  # round 1 stopped at <dream_start>; round 2 is queued with the image
    s.cancel("doc")  # e.g. the session was evicted: the next round starts from scratch
    d.ticket = s.submit(d.doc.text_request(), "doc")
    while not d.ticket.done:
        s.step()
    assert_same(d.ticket.result, alone(engine, ["a red circle"], params)[1])
    parked = s.submit(TextRequest(["a"], 4, seed=1), "idle")
    while not parked.done:
        s.step()
    assert s.sessions == 1
    now[0] = 11.0
    s.step()
    assert s.sessions == 0 and s.reserved_tokens == 0


def test_tokens_stream_as_they_are_decoded(talker):
    engine = talker
    req = TextRequest(["a red circle"], 20, 1.0, seed=11, allow_dream=False)

    async def stream() -> list:
        s = Scheduler(engine)
        s.start()
        try:
            return [item async for item in s.submit(req, stream=True)]
        finally:
            s.stop()

    items = asyncio.run(stream())
    events, result = items[:-1], items[-1]
    assert all(isinstance(e, TokenEvent) for e in events) and isinstance(result, TextResult)
    assert_same(result, engine.continue_batch([req])[0])
    assert [e.token_id for e in events][:len(result.token_ids)] == result.token_ids
    assert len(events) == result.new_tokens and "".join(e.text for e in events) == result.text


@pytest.mark.e2e
def test_llm_server_deployment_streams_and_keeps_sessions(ray_session, tmp_path):
    """LLMServer on the session's Ray: generate, generate_stream (handle stream=True), cancel."""
    from ray import serve

    sys.path.insert(0, str(Path(__file__).parent))
    from _serve_helpers import make_checkpoint

    from dreamcore.checkpoint import from_pretrained
    from pipelines.serve.deployments import LLMServer

    ckpt = make_checkpoint(tmp_path / "ckpt")
    serve.start(proxy_location="Disabled")
    try:
        handle = serve.run(LLMServer.options(ray_actor_options={"num_cpus": 0}).bind(str(ckpt), "cpu", 4),
                           name="scheduler-test", route_prefix=None)
        model, tok = from_pretrained(str(ckpt), components=("llm", "vision", "projectors"))
        local = TextEngine(model.eval(), tok)
        params = GenerationParams(max_new_tokens=20, max_images=2, temperature=1.0, top_p=1.0, seed=2)
        want = alone(local, ["a red circle"], params)
        doc, rounds = Document(["a red circle"], params), []
        while not doc.finished:  # the document's rounds over one session; the first one streamed
            if not rounds:
                items = list(handle.options(stream=True).generate_stream.remote(doc.text_request(), "s1"))
                assert all(isinstance(i, TokenEvent) for i in items[:-1])
                res = items[-1]
            else:
                res = handle.generate.remote(doc.text_request(), "s1").result()
            rounds.append(res)
            doc.add_text(res)
            if doc.wants_image:
                doc.add_image(_image(doc.images))
        assert len(rounds) == len(want) >= 2
        for got, w in zip(rounds, want):
            assert_same(got, w)
        info = handle.info.remote().result()["scheduler"]
        assert info["sessions"] == 0 and info["reserved_tokens"] == 0
        parked = handle.generate.remote(dream_requests(["a blue square"])[0], "s2").result()
        assert parked.stop == "dream" and handle.info.remote().result()["scheduler"]["sessions"] == 1
        assert handle.cancel.remote("s2").result() and not handle.cancel.remote("s2").result()
        assert handle.info.remote().result()["scheduler"]["sessions"] == 0
    finally:
        serve.delete("scheduler-test")
        serve.shutdown()  # the next module starts Serve with its own HTTP options
