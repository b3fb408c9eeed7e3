"""Step-level batching for the image replica: images join and leave the UNet batch at every step.

`serve.batch` around `decode_dreams` is static batching: a batch forms, denoises all its steps,
and an image that arrives meanwhile waits for the whole run. `Denoiser` runs the decoder one
denoising step at a time over every image in flight (`DiffusionDecoder.step`, the same code as
`DiffusionDecoder.sample`):

- Admission at every step. `submit` starts an image's trajectory (its starting noise, drawn from
  its own seed) and queues it; each `step()` admits waiting images into free slots (at most
  `max_batch_size` images; a guided image adds its unconditional row to the same UNet call), runs
  one UNet call for all of them, and hands back those that finished. Images with different step
  counts, guidance scales and progress share the call: the UNet takes one timestep per row.
- Same image whatever the company: each image's noise comes from its own generator, so an image
  equals the one `decode_dreams` draws alone, up to floating-point rounding of batched kernels.
- One bad image fails alone. Inputs are checked per image in `submit` (shapes, finite values,
  guidance); if a UNet call still raises, each image is retried on its own and only the ones
  that fail alone get the error.
- Bounded. At most `max_waiting` images wait; beyond that `submit` raises `DecoderBusyError`
  (serving answers 503 + Retry-After) rather than queueing without limit.
- Cancel. A caller that goes away cancels its future; the image leaves the batch at the next step.

Results are `concurrent.futures.Future`s of (R, R, 3) uint8 arrays: `asyncio.wrap_future` in a
replica, `.result()` in plain code.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np
import torch

from dreamcore.decoder import DiffusionDecoder, Trajectory
from dreamcore.engine import DreamConditions
from dreamcore.steploop import StepLoop

log = logging.getLogger(__name__)


class DecoderBusyError(RuntimeError):
    """Too many images waiting for this decoder: retry later (serving: 503 + Retry-After)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Image:
    run: Trajectory
    future: Future
    submitted: float


class Denoiser(StepLoop):
    """Continuous (step-level) batching of images over one `DiffusionDecoder`."""

    thread_name = "dreamcore-denoiser"

    def __init__(self, decoder: DiffusionDecoder, max_batch_size: int = 8, max_waiting: int = 256,
                 retry_after_s: float = 1.0) -> None:
        super().__init__()
        if max_batch_size < 1:
            raise ValueError(f"Denoiser: max_batch_size={max_batch_size}; give at least 1")
        self.decoder = decoder
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self._waiting: collections.deque[_Image] = collections.deque()
        self._running: list[_Image] = []
        self._lock = threading.Lock()
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=100)  # images per UNet call
        self.unet_calls = 0
        self.images_done = 0

    # ------------------------------------------------------------------------------------------
    # Caller side

    def submit(self, dream: DreamConditions) -> Future:
        """Queue one image; a bad input raises ValueError here, naming the field."""
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise DecoderBusyError(f"{len(self._waiting)} images are waiting for this decoder "
                                       f"(max_waiting={self.max_waiting}); retry later", self.retry_after_s)
        dev = self.decoder.unet.device
        with torch.inference_mode():
            run = self.decoder.start(
                torch.as_tensor(np.asarray(dream.cond)).to(dev),
                None if dream.uncond is None else torch.as_tensor(np.asarray(dream.uncond)).to(dev),
                dream.num_inference_steps, dream.guidance_scale, torch.Generator().manual_seed(int(dream.seed)))
        fut: Future = Future()
        with self._lock:
            self._waiting.append(_Image(run, fut, time.monotonic()))
        self._wake.set()
        return fut

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------------------------------
    # The step loop (run by StepLoop's thread in a replica; tests call step() by hand)

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit, run one UNet call over every image in flight, hand back the finished ones.

        Returns whether there was work.
        """
        self._running = [im for im in self._running if not im.future.cancelled()]
        with self._lock:
            while self._waiting and len(self._running) < self.max_batch_size:
                im = self._waiting.popleft()
                if not im.future.cancelled():
                    self._running.append(im)
        if not self._running:
            return False
        self.batch_sizes.append(len(self._running))
        self.unet_calls += 1
        before = [(im.run.x, im.run.index) for im in self._running]
        try:
            self.decoder.step([im.run for im in self._running])
        except Exception:  # find the image(s) that fail on their own; the others go on
            log.exception("a batched denoising step failed; retrying its %d images one by one", len(self._running))
            for im, (x, index) in zip(self._running, before):
                im.run.x, im.run.index = x, index
            self._isolate()
        finished = [im for im in self._running if im.run.done]
        self._running = [im for im in self._running if not im.run.done]
        if finished:
            try:
                pixels = list(self.decoder.pixels_uint8([im.run for im in finished]))
            except Exception:  # as for the step: image by image, so only the one that fails alone fails
                log.exception("decoding %d finished images to pixels failed; retrying one by one", len(finished))
                pixels = [self._pixels_alone(im) for im in finished]
            for im, px in zip(finished, pixels):
                if px is not None:
                    self._resolve(im, px)
        return True

    def _pixels_alone(self, im: _Image) -> np.ndarray | None:
        try:
            return self.decoder.pixels_uint8([im.run])[0]
        except Exception as e:
            log.exception("decoding one image to pixels failed")
            self._fail(im, RuntimeError(f"the decoder failed on this image ({type(e).__name__}); retry"))
            return None

    def _isolate(self) -> None:
        """After a failed batched step: step each image alone; fail only those that fail alone."""
        keep = []
        for im in self._running:
            x, index = im.run.x, im.run.index
            try:
                self.decoder.step([im.run])
                keep.append(im)
            except Exception as e:
                im.run.x, im.run.index = x, index
                log.exception("denoising failed for one image")
                self._fail(im, RuntimeError(f"the decoder failed on this image ({type(e).__name__}); retry"))
        self._running = keep

    @staticmethod
    def _resolve(im: _Image, pixels: np.ndarray) -> None:
        try:
            im.future.set_result(pixels)
        except InvalidStateError:  # cancelled meanwhile
            pass

    @staticmethod
    def _fail(im: _Image, error: BaseException) -> None:
        try:
            im.future.set_exception(error)
        except InvalidStateError:
            pass
