"""Step-level batching of the image side (dreamcore/denoiser.py): images join and leave the UNet
batch at any step, and each is the image `decode_dreams` draws alone; a bad image fails alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from _model_helpers import debug_config, one_thread  # noqa: F401 (fixture)

from dreamcore.decoder import DiffusionDecoder
from dreamcore.denoiser import DecoderBusyError, Denoiser
from dreamcore.engine import DreamConditions, decode_dreams

pytestmark = pytest.mark.usefixtures("one_thread")

DEBUG = debug_config()
Q, C = DEBUG.dream.num_queries, DEBUG.decoder.cross_attention_dim


@pytest.fixture(scope="module")
def decoder() -> DiffusionDecoder:
    torch.manual_seed(0)
    return DiffusionDecoder.from_config(debug_config(decoder={"eta": 0.5}).decoder).eval()


def _dream(seed: int, steps: int = 4, scale: float | None = 3.0, q: int = Q) -> DreamConditions:
    g = np.random.default_rng(seed)
    cond = g.standard_normal((q, C)).astype(np.float32)
    uncond = None if scale == 1.0 else g.standard_normal((q, C)).astype(np.float32)
    return DreamConditions(cond, uncond, seed, steps, scale)


def _alone(decoder: DiffusionDecoder, dream: DreamConditions) -> np.ndarray:
    return decode_dreams(decoder, [dream])[0]


def _close(a: np.ndarray, b: np.ndarray) -> None:
    # Batched kernels may round differently from a batch of one: at most one level of a pixel.
    assert a.shape == b.shape and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_images_joining_at_any_step_equal_the_image_drawn_alone(decoder):
    den = Denoiser(decoder, max_batch_size=3)
    # Different step counts, guidance on and off, stochastic steps (eta 0.5): each keeps its own.
    plan = {0: [_dream(1, 6), _dream(2, 3, 1.0)], 2: [_dream(3, 5, 7.5)], 3: [_dream(4, 2), _dream(5, 4)]}
    futures: list[tuple[DreamConditions, object]] = []
    step = 0
    while step < 40:
        for d in plan.get(step, []):
            futures.append((d, den.submit(d)))
        if not den.step() and step > max(plan):
            break
        step += 1
    assert all(f.done() for _, f in futures)
    assert max(den.batch_sizes) == 3  # the slots filled up: images shared UNet calls
    assert den.unet_calls < sum(d.num_inference_steps for d, _ in futures)
    for d, f in futures:
        _close(f.result(), _alone(decoder, d))


def test_a_late_image_joins_the_batch_in_flight_and_cancel_frees_its_slot(decoder):
    den = Denoiser(decoder, max_batch_size=2)
    first = den.submit(_dream(1, 8))
    den.step()
    den.step()
    late = den.submit(_dream(2, 8))
    den.step()
    assert den.running == 2 and den.batch_sizes[-1] == 2  # joined mid-run, no wait for the first to end
    late.cancel()
    den.step()
    assert den.running == 1 and den.batch_sizes[-1] == 1
    while den.step():
        pass
    _close(first.result(), _alone(decoder, _dream(1, 8)))


def test_a_bad_image_is_refused_alone_and_its_batch_mates_finish(decoder):
    den = Denoiser(decoder, max_batch_size=4)
    good = [den.submit(_dream(i, 3)) for i in range(2)]
    wrong_width = DreamConditions(np.zeros((Q, C + 1), np.float32), None, 0, 3, 1.0)
    with pytest.raises(ValueError, match=r"cond has shape \(\d+, \d+\); it must be"):
        den.submit(wrong_width)
    nan = DreamConditions(np.full((Q, C), np.nan, np.float32), None, 0, 3, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        den.submit(nan)
    with pytest.raises(ValueError, match="uncond"):
        den.submit(DreamConditions(np.zeros((Q, C), np.float32), None, 0, 3, 4.0))
    while den.step():
        pass
    for i, f in enumerate(good):
        _close(f.result(), _alone(decoder, _dream(i, 3)))


def test_a_step_that_fails_in_a_batch_is_retried_per_image(decoder):
    den = Denoiser(decoder, max_batch_size=4)
    # A condition with another query count cannot share the UNet call (its rows do not stack), but
    # runs fine alone: it must be drawn, and so must its batch-mates.
    odd = _dream(7, 3, q=Q + 2)
    futures = [den.submit(_dream(1, 3)), den.submit(odd), den.submit(_dream(2, 3))]
    # One image whose state is broken fails alone, with a message and no traceback for the caller.
    broken = den.submit(_dream(3, 3))
    den._waiting[-1].run.x = torch.zeros(5, 2, 2)
    while den.step():
        pass
    _close(futures[0].result(), _alone(decoder, _dream(1, 3)))
    _close(futures[1].result(), _alone(decoder, odd))
    _close(futures[2].result(), _alone(decoder, _dream(2, 3)))
    with pytest.raises(RuntimeError, match="the decoder failed on this image"):
        broken.result()


def test_images_that_cannot_share_a_call_are_drawn_alone_to_the_end(decoder):
    """A trajectory whose sample has another size shares neither the UNet call nor the final
    pixel batch with the others; both are retried image by image and every image comes back."""
    den = Denoiser(decoder, max_batch_size=4)
    normal = den.submit(_dream(1, 3))
    small = den.submit(_dream(2, 3))
    den._waiting[-1].run.x = torch.randn(3, 8, 8)  # half the side: stacks with no other image
    while den.step():
        pass
    _close(normal.result(), _alone(decoder, _dream(1, 3)))
    assert small.result().shape == (8, 8, 3)


def test_waiting_is_bounded(decoder):
    den = Denoiser(decoder, max_batch_size=1, max_waiting=2, retry_after_s=3.0)
    den.submit(_dream(1))
    den.submit(_dream(2))
    with pytest.raises(DecoderBusyError) as e:
        den.submit(_dream(3))
    assert e.value.retry_after_s == 3.0 and "max_waiting=2" in str(e.value)


def test_the_thread_serves_concurrent_callers(decoder):
    den = Denoiser(decoder, max_batch_size=4)
    den.start()
    try:
        assert den.alive
        results: dict[int, np.ndarray] = {}

        def call(i: int) -> None:
            time.sleep(0.01 * i)
            results[i] = den.submit(_dream(i, 4)).result(timeout=60)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert sorted(results) == list(range(5))
        for i, px in results.items():
            _close(px, _alone(decoder, _dream(i, 4)))
    finally:
        den.stop()
    assert not den.alive
