"""Continuous batching for the LLM replica, with each document's KV cache kept between image rounds.

`TextEngine.continue_batch` (dreamcore/engine.py) is static batching: a batch runs until its last
row stops, and every text round of an interleaved document re-embeds and re-prefills the whole
document, images included. `Scheduler` runs the same engine pieces one decode step at a time:

- Iteration-level batching. `step()` (1) admits waiting rounds into free batch slots, each
  prefilled on its own; (2) samples one token for every running row with the engine's sampler and
  stop rule (`TextEngine.advance`: one sampler, one stop rule); (3) evicts rows that stopped;
  rows that stopped at `<dream_start>` get their dream conditions from one forward of
  `<dream_start>` + the Q dream queries on top of their own cache; (4) runs one batched decode
  forward of the rows still running. A request joins at the next step; nothing waits for the
  batch to drain.
- Rows of different lengths share a decode step as in the engine: the batch cache is left-padded,
  the 2D attention mask hides the padding and position_ids count each row's own tokens, so a row
  gets the tokens it would get alone.
- Sessions. A round submitted with a `session_id` keeps its cache when it stops at
  `<dream_start>` (prefix + sampled text + `<dream_start>` + the dream queries: everything the
  next round's layout starts with). When the document comes back with the drawn image, the new
  layout is compared position by position with what the cache holds (token ids; dream-query
  slots; image slots by a digest of the image's pixels); the cache is cropped to the common
  prefix and only the rest (`<dream_end>`, the image's comprehension block, new text) is
  prefilled. Requests still carry the whole document, so a cache that is gone (expired, evicted,
  another replica) costs a full prefill, never a wrong answer; and when re-tokenizing the decoded
  text gives other ids than those sampled, the cache is cropped where they part, which keeps
  the result equal to `continue_batch`. A session ends when its document finishes (a round stops
  at EOS or a limit), after `session_ttl_s` without a round, or on `cancel`.
- Bound. `max_cache_tokens` bounds the tokens held: each round reserves its worst case (prompt +
  token budget + the dream queries) when submitted; a parked session holds its cache's length.
  A round that does not fit first evicts parked sessions, least recently used first; if the
  running and waiting rounds alone leave no room it is refused at once with `CacheFullError`
  (serving answers 503 + Retry-After). The waiting queue is therefore bounded too. Left padding
  of the running batch comes on top (at most max_batch_size x the longest row).
- Output. Each submitted round gets a `Ticket`: `TokenEvent`s as tokens are sampled (with
  `stream=True`), then the `TextResult`, readable from asyncio (`async for`, `await wait()`) or
  by polling (tests drive `step()` by hand). `cancel` releases the round's reservation at once;
  the step thread drops its row and cache at the start of its next step.

Why transformers' `DynamicCache`: it is what the LLaMA body fills and reads during prefill and
decode (the engine already uses it), and it has the per-session operations needed here:
`crop` (cut a parked cache back to the common prefix) and `batch_select_indices` (evict rows).
Two small pieces are written here on its layer tensors, because no transformers cache has them:
joining caches of different lengths into one left-padded batch (`_join`) and dropping the
leading columns that are padding in every row (`_trim`). transformers' own continuous batching
(`generation.continuous_batching`, a paged cache) does not fit: it takes token ids only (the
image and dream-query slots here are embeddings), samples with its own logits processors (a
second sampler), and switches the model's attention implementation.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from dreamcore.engine import Layout, Row, TextEngine, TextRequest, TextResult
from dreamcore.steploop import StepLoop

log = logging.getLogger(__name__)

_QUERY = "<dream-query>"  # the key of a dream-query slot: the same embedding in every document


class CacheFullError(RuntimeError):
    """No room in the KV cache for this round while others run: retry later (serving: 503)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class TokenEvent:
    """One sampled token of a streamed round, in order; the stop token comes with text ''."""

    token_id: int
    text: str  # what this token adds to TextResult.text ('' while a multi-token character is incomplete)


class Ticket:
    """The output channel of one submitted round: TokenEvents (streamed rounds), then the TextResult."""

    def __init__(self, session_id: str | None, stream: bool, loop: asyncio.AbstractEventLoop | None) -> None:
        self.session_id = session_id
        self.stream = stream
        self.result: TextResult | None = None
        self.cancelled = False
        self._items: collections.deque[TokenEvent | TextResult] = collections.deque()
        self._loop = loop
        self._ready = asyncio.Event() if loop is not None else None

    @property
    def done(self) -> bool:
        return self.result is not None

    def _put(self, item: TokenEvent | TextResult) -> None:
        """Called by the step thread; wakes the consumer's event loop."""
        if isinstance(item, TextResult):
            self.result = item
        self._items.append(item)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)  # type: ignore[union-attr]
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass

    def poll(self) -> list[TokenEvent | TextResult]:
        """Everything delivered since the last poll (for callers without an event loop)."""
        out = []
        while self._items:
            out.append(self._items.popleft())
        return out

    async def __aiter__(self) -> AsyncIterator[TokenEvent | TextResult]:
        if self._ready is None:
            raise RuntimeError("this ticket was submitted without an event loop; use poll()")
        while True:
            while self._items:
                item = self._items.popleft()
                yield item
                if isinstance(item, TextResult):
                    return
            self._ready.clear()
            if not self._items:
                await self._ready.wait()

    async def wait(self) -> TextResult:
        """The round's TextResult (token events are skipped)."""
        async for item in self:
            if isinstance(item, TextResult):
                return item
        raise AssertionError("unreachable: a ticket's stream ends with its result")


@dataclass
class _Session:
    id: str | None  # None: a one-round request, dropped when it ends
    cache: DynamicCache | None = None  # (1, H, L, d) per layer while parked between rounds
    keys: list[Hashable] = field(default_factory=list)  # what each cached position holds
    reserved: int = 0  # tokens held against max_cache_tokens
    last_used: float = 0.0
    ticket: Ticket | None = None  # the round in flight


@dataclass
class _Job:
    """A submitted round: its ticket, session, decoding state and laid-out prompt."""

    ticket: Ticket
    session: _Session
    row: Row
    layout: Layout
    keys: list[Hashable]  # what each position of this row's cache holds (layout, then fed tokens)
    text_ids: list[int] = field(default_factory=list)
    emitted: str = ""  # text sent in TokenEvents so far


class Scheduler(StepLoop):
    """Iteration-level batching over one TextEngine (see the module docstring)."""

    thread_name = "dreamcore-scheduler"

    def __init__(self, engine: TextEngine, max_batch_size: int = 8, max_cache_tokens: int | None = None,
                 session_ttl_s: float = 600.0, retry_after_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.engine, self.tok = engine, engine.tok
        self.max_batch_size = max_batch_size
        self.max_cache_tokens = max_cache_tokens or 2 * max_batch_size * engine.max_len
        if self.max_cache_tokens < engine.max_len:
            raise ValueError(f"max_cache_tokens={self.max_cache_tokens} cannot hold one full context of "
                             f"{engine.max_len} tokens; raise it to at least {engine.max_len}")
        self.session_ttl_s, self.retry_after_s, self.clock = session_ttl_s, retry_after_s, clock
        self.q = self.tok.num_dream_queries
        # Book-keeping shared with submitting threads (under _lock); tensors belong to the step thread.
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._waiting: collections.deque[_Job] = collections.deque()
        self.reserved_tokens = 0
        # The running batch: rows in batch order, their cache (B, H, T, d), mask (B, T), next position
        # (B,) and the logits their next token is sampled from (B, V).
        self._jobs: list[_Job] = []
        self._cache: DynamicCache | None = None
        self._mask = self._pos = self._logits = torch.empty(0)
        # Counters (tests and benchmarks): tokens run through the model outside / inside decode steps.
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=100)

    # -- submission (any thread) -----------------------------------------------------------------

    def submit(self, request: TextRequest, session_id: str | None = None, stream: bool = False,
               loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Queue one round; raises CacheFullError when it cannot fit. A bad request gets its result at once.

        `loop`: the event loop that will read the ticket (default: the running one, if any).
        """
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        ticket = Ticket(session_id, stream, loop)
        try:  # tokenizing and image decoding happen here, in the caller's thread
            lay = self.engine.layout(request.parts)
            row = self.engine.new_row(request, len(lay))
        except (ValueError, OSError) as e:  # too long, undecodable image bytes, unencodable text
            ticket._put(self.engine.failed(e))
            return ticket
        need = len(lay) + max(row.budget, len(row.new_ids))
        if request.allow_dream or request.force_dream:
            need += self.q
        with self._lock:
            sess = self._sessions.get(session_id) if session_id is not None else None
            if sess is not None and sess.ticket is not None:
                ticket._put(TextResult("", "error", 0, 0, error=f"session {session_id} has a round in flight; "
                                       "send the next round after this one returns"))
                return ticket
            self._make_room(need - (sess.reserved if sess else 0), keep=sess)
            if sess is None:
                sess = _Session(session_id)
                if session_id is not None:
                    self._sessions[session_id] = sess
            self.reserved_tokens += need - sess.reserved
            sess.reserved, sess.ticket, sess.last_used = need, ticket, self.clock()
            self._waiting.append(_Job(ticket, sess, row, lay, self._keys(lay)))
        self._wake.set()
        return ticket

    def cancel(self, session_id: str) -> bool:
        """End a session: its round in flight (if any) is cancelled and its cache released."""
        with self._lock:
            sess = self._sessions.pop(session_id, None)
            if sess is None:
                return False
            self._release(sess)
            if sess.ticket is not None:
                sess.ticket.cancelled = True
        self._wake.set()
        return True

    def cancel_ticket(self, ticket: Ticket) -> None:
        """Cancel one round (a caller that went away); a session's parked cache goes with it."""
        if ticket.done:
            return
        if ticket.session_id is not None:
            self.cancel(ticket.session_id)
            return
        with self._lock:
            ticket.cancelled = True
            for job in [*self._waiting, *self._jobs]:
                if job.ticket is ticket:
                    self._release(job.session)
        self._wake.set()

    def _make_room(self, need: int, keep: _Session | None) -> None:
        """Evict parked sessions (least recently used first) until `need` more tokens fit, or refuse."""
        if self.reserved_tokens + need <= self.max_cache_tokens:
            return
        parked = sorted((s for s in self._sessions.values() if s.ticket is None and s is not keep),
                        key=lambda s: s.last_used)
        for sess in parked:
            if self.reserved_tokens + need <= self.max_cache_tokens:
                break
            del self._sessions[sess.id]  # type: ignore[arg-type]
            self._release(sess)
        if self.reserved_tokens + need > self.max_cache_tokens:
            raise CacheFullError(
                f"the model's KV cache is full ({self.reserved_tokens} of {self.max_cache_tokens} tokens held by "
                f"running requests; this one needs {need}); retry in a moment", self.retry_after_s)

    def _release(self, sess: _Session) -> None:
        self.reserved_tokens -= sess.reserved
        sess.reserved, sess.cache, sess.keys = 0, None, []

    def _keys(self, lay: Layout) -> list[Hashable]:
        """Per position, what a cache there holds: token id, dream-query slot, or the image's digest."""
        keys: list[Hashable] = list(lay.ids)
        for slot in (s for s in lay.dream_slots if s >= 0):
            keys[slot:slot + self.q] = [_QUERY] * self.q
        n = self.tok.num_image_tokens
        for slot, im in zip(lay.image_slots, lay.images):
            digest = hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).digest()
            keys[slot:slot + n] = [digest] * n
        return keys

    # -- the loop (one thread) -------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._jobs)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def idle_wait_s(self) -> float:
        return min(1.0, self.session_ttl_s)  # expired sessions are swept even when idle

    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration: sweep, admit, sample, evict, decode. Returns whether there was work."""
        self._sweep()
        try:
            admitted = self._admit()
            if not self._jobs:
                return admitted
            self._sample_and_evict()
            if self._jobs:
                self._decode()
            return True
        except Exception:  # a model failure (e.g. out of memory) must not leave callers waiting forever
            log.exception("scheduler step failed; failing the running requests")
            failed = TextResult("", "error", 0, 0, error="the model failed while generating this request; retry")
            for job in self._jobs:
                self._finish(job, failed, park=False)
            self._jobs, self._cache = [], None
            return True

    def _sweep(self) -> None:
        """Drop cancelled rounds and expired sessions."""
        now = self.clock()
        with self._lock:
            for sid in [sid for sid, s in self._sessions.items()
                        if s.ticket is None and now - s.last_used > self.session_ttl_s]:
                self._release(self._sessions.pop(sid))
            self._waiting = collections.deque(j for j in self._waiting if not self._drop_if_cancelled(j))
        gone = [i for i, j in enumerate(self._jobs) if j.ticket.cancelled]
        if gone:
            for i in gone:
                self._drop_if_cancelled(self._jobs[i])
            self._keep([i for i in range(len(self._jobs)) if i not in gone])

    def _drop_if_cancelled(self, job: _Job) -> bool:
        if job.ticket.cancelled and not job.ticket.done:
            job.ticket._put(TextResult("", "error", 0, 0, error="the request was cancelled"))
        return job.ticket.cancelled

    def _admit(self) -> bool:
        admitted = False
        while len(self._jobs) < self.max_batch_size:
            with self._lock:
                if not self._waiting:
                    break
                job = self._waiting.popleft()
            admitted = True
            if job.row.stop == "length":  # no budget: nothing to sample, nothing to cache
                self._finish(job, self.engine.result(job.row, None), park=False)
                continue
            cache, logits, cond = self._prefill(job)
            if cond is not None:  # force_dream: the prefill ran the dream queries too
                self._finish(job, self.engine.result(job.row, cond), park=True, cache=cache)
                continue
            self._join(job, cache, logits)
        return admitted

    def _prefill(self, job: _Job) -> tuple[DynamicCache, torch.Tensor, np.ndarray | None]:
        """Run what the session's cache lacks of the job's layout -> (1-row cache, (V,) logits, condition).

        The (Q, C) condition is there for force_dream rows, whose prefill ends with the dream queries.
        """
        sess, e = job.session, self.engine
        cache, keep = sess.cache, 0
        if cache is not None:
            keep = min(_common_prefix(sess.keys, job.keys), len(job.keys) - 1)  # at least one token to run
            extra = cache.get_seq_length() - keep
            if extra > 0:
                cache.crop(-extra)
        sess.cache, sess.keys = None, []  # the cache now belongs to the job
        x = e.embed_layout(job.layout, keep)  # (L - keep, D)
        if job.row.stop == "dream":
            x = torch.cat([x, e.dream_tail(job.row.new_ids)])
            job.keys += [self.tok.dream_start_id] + [_QUERY] * self.q
        n = keep + x.shape[0]
        out = e.model.hidden_states(x[None], torch.ones(1, n, dtype=torch.long, device=e.device),
                                    position_ids=torch.arange(keep, n, device=e.device)[None],
                                    cache=cache if cache is not None else DynamicCache(), use_cache=True)
        self.prefill_tokens += x.shape[0]
        h = out.last_hidden_state[0]  # (L - keep, D)
        cond = None
        if job.row.stop == "dream":
            cond = e.conditions(h[None, -self.q:])[0].float().cpu().numpy()
        return out.cache, e.logits(h[-1:])[0], cond

    def _join(self, job: _Job, cache: DynamicCache, logits: torch.Tensor) -> None:
        """Add a prefilled row to the running batch (left-padding whichever side is shorter)."""
        n = cache.get_seq_length()
        mask = torch.ones(1, n, dtype=torch.long, device=self.engine.device)
        pos = torch.tensor([n], device=self.engine.device)
        if self._cache is None:
            self._cache, self._mask, self._pos, self._logits = cache, mask, pos, logits[None]
        else:
            self._cache, self._mask = _join(self._cache, self._mask, cache, mask)
            self._pos = torch.cat([self._pos, pos])
            self._logits = torch.cat([self._logits, logits[None]])
        self._jobs.append(job)

    def _sample_and_evict(self) -> None:
        e = self.engine
        for i, job in enumerate(self._jobs):
            tok = e.advance(job.row, self._logits[i])
            if job.ticket.stream:
                self._emit(job, tok)
        dreamers = [i for i, j in enumerate(self._jobs) if j.row.stop == "dream"]
        if dreamers:
            self._dream(dreamers)
        for j in self._jobs:
            if j.row.stop in ("eos", "length"):
                self._finish(j, e.result(j.row, None), park=False)
        self._keep([i for i, j in enumerate(self._jobs) if j.row.stop is None])

    def _dream(self, idx: list[int]) -> None:
        """Dream conditions of rows that sampled <dream_start>: one forward of <dream_start> + queries each."""
        e, q = self.engine, self.q
        ix = torch.tensor(idx, device=e.device)
        cache = DynamicCache(ddp_cache_data=[(la.keys[ix], la.values[ix]) for la in _layers(self._cache)])
        mask = self._mask[ix]
        cache, mask = _trim(cache, mask)
        tail = e.dream_tail([self.tok.dream_start_id])  # (1 + Q, D)
        x = tail[None].repeat(len(idx), 1, 1)  # (B, 1 + Q, D)
        mask = torch.cat([mask, torch.ones(len(idx), 1 + q, dtype=mask.dtype, device=e.device)], dim=1)
        pos = self._pos[ix, None] + torch.arange(1 + q, device=e.device)
        out = e.model.hidden_states(x, mask, position_ids=pos, cache=cache, use_cache=True)
        self.prefill_tokens += len(idx) * (1 + q)
        conds = e.conditions(out.last_hidden_state[:, -q:]).float().cpu().numpy()  # (B, Q, C)
        for b, i in enumerate(idx):
            job = self._jobs[i]
            job.keys += [self.tok.dream_start_id] + [_QUERY] * q
            start = int(mask[b].argmax())  # first real column: the row's own cache starts there
            own = DynamicCache(ddp_cache_data=[(la.keys[b:b + 1, :, start:], la.values[b:b + 1, :, start:])
                                               for la in _layers(out.cache)])
            self._finish(job, e.result(job.row, conds[b]), park=True, cache=own)

    def _decode(self) -> None:
        """One batched forward of the token each running row just sampled."""
        e = self.engine
        ids = torch.tensor([j.row.new_ids[-1] for j in self._jobs], device=e.device)[:, None]  # (B, 1)
        self._mask = torch.cat([self._mask, torch.ones_like(ids)], dim=1)
        out = e.model.hidden_states(e.model.embed_tokens(ids), self._mask, position_ids=self._pos[:, None],
                                    cache=self._cache, use_cache=True)
        self._cache = out.cache
        self._logits = e.logits(out.last_hidden_state[:, -1])  # (B, V)
        self._pos = self._pos + 1
        for j in self._jobs:
            j.keys.append(j.row.new_ids[-1])
        self.decode_tokens += len(self._jobs)
        self.batch_sizes.append(len(self._jobs))

    def _keep(self, idx: list[int]) -> None:
        """Keep only batch rows `idx` (in order); the cache drops the others and any all-padding columns."""
        if len(idx) == len(self._jobs):
            return
        self._jobs = [self._jobs[i] for i in idx]
        if not idx:
            self._cache = None
            return
        ix = torch.tensor(idx, device=self.engine.device)
        self._cache.batch_select_indices(ix)  # type: ignore[union-attr]
        self._cache, self._mask = _trim(self._cache, self._mask[ix])  # type: ignore[arg-type]
        self._pos, self._logits = self._pos[ix], self._logits[ix]

    def _emit(self, job: _Job, tok: int) -> None:
        """The TokenEvent of a sampled token: the text it adds once the decoded text extends what was sent."""
        text = ""
        if tok not in (self.tok.eos_id, self.tok.dream_start_id):
            job.text_ids.append(tok)
            full = self.tok.decode(job.text_ids)
            if full.startswith(job.emitted) and not full.endswith("\ufffd"):
                text, job.emitted = full[len(job.emitted):], full
        if job.row.stop is not None:  # the last event carries whatever was held back
            full = self.tok.decode(job.text_ids)
            if full.startswith(job.emitted):
                text, job.emitted = text + full[len(job.emitted):], full
        job.ticket._put(TokenEvent(tok, text))

    def _finish(self, job: _Job, result: TextResult, park: bool, cache: DynamicCache | None = None) -> None:
        """Deliver the result; park the session's cache (a dream stop of a named session) or release it."""
        sess = job.session
        with self._lock:
            alive = sess.id is not None and self._sessions.get(sess.id) is sess and not job.ticket.cancelled
            sess.ticket, sess.last_used = None, self.clock()
            if park and alive and cache is not None:
                sess.cache, sess.keys = cache, job.keys
                self.reserved_tokens += cache.get_seq_length() - sess.reserved
                sess.reserved = cache.get_seq_length()
            else:
                if sess.id is not None and self._sessions.get(sess.id) is sess:
                    del self._sessions[sess.id]
                self._release(sess)
        if not job.ticket.done:
            job.ticket._put(result)


# ----------------------------------------------------------------------------------------------
# Cache pieces transformers does not have (see the module docstring)


def _common_prefix(a: list[Hashable], b: list[Hashable]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = cache.layers
    if any(type(layer) is not DynamicLayer for layer in layers):
        raise TypeError("the scheduler needs full-attention DynamicLayer caches (no sliding-window layers)")
    return layers


def _join(a: DynamicCache, mask_a: torch.Tensor, b: DynamicCache, mask_b: torch.Tensor
          ) -> tuple[DynamicCache, torch.Tensor]:
    """Rows of `a` then rows of `b` as one left-padded batch cache and its (B, T) mask."""
    ta, tb = mask_a.shape[1], mask_b.shape[1]
    t = max(ta, tb)

    def pad(x: torch.Tensor, n: int) -> torch.Tensor:  # (B, H, T, d) -> (B, H, T + n, d), zeros on the left
        return F.pad(x, (0, 0, n, 0)) if n else x

    kv = [(torch.cat([pad(la.keys, t - ta), pad(lb.keys, t - tb)]),
           torch.cat([pad(la.values, t - ta), pad(lb.values, t - tb)]))
          for la, lb in zip(_layers(a), _layers(b))]
    mask = torch.cat([F.pad(mask_a, (t - ta, 0)), F.pad(mask_b, (t - tb, 0))])
    return DynamicCache(ddp_cache_data=kv), mask


def _trim(cache: DynamicCache, mask: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Drop the leading columns that are padding in every row (after the rows that needed them left)."""
    start = int(mask.any(0).long().argmax())
    if start == 0:
        return cache, mask
    for layer in _layers(cache):
        layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
    return cache, mask[:, start:]
