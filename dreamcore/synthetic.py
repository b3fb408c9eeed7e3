"""The synthetic "shapes" world: documents, images, captions and a scorer.

Why it exists: with no network and no pretrained weights, the embedded default still needs data
whose content a model can learn in minutes and whose outputs can be scored without a human. Every
image holds one coloured shape (colour x shape x size x position) on a white background; every
document is MMC4-shaped so the real curation pipeline crawls it over HTTP like any web corpus.

- `render_image(name, size)`: the image named `<colour>-<shape>-<size>-<position>-v<k>`, drawn
  with PIL at 4x and box-downsampled (anti-aliased, deterministic).
- `make_corpus(num_docs, seed, image_base_url)`: MMC4 documents (several images each, image i
  matched to the sentence that describes it, followed by a sentence that captions it).
- `ImageServer`: a loopback ThreadingHTTPServer that serves those PNGs by name (404 otherwise).
- Held-out split: `HELDOUT` attribute combinations never appear in training documents;
  `heldout_prompts` / `heldout_images` draw evaluation cases from them only.
- `score_image(img)`: (colour, shape) read from any resolution, robust to blur and noise
  (colour = dominant saturated hue; shape = best match of the colour mask against rendered
  templates of each shape with the same area and centroid, at several blur levels).
- `score_caption(text)`: (colour, shape) named in a sentence.
- `evaluate(model, tokenizer)`: held-out text -> image and image -> text accuracy, generated
  by the serving engine. How the tiny preset is trained on this world: `pipelines.recipe`.
"""

from __future__ import annotations

import colorsys
import functools
import io
import random
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# ----------------------------------------------------------------------------------------------
# The world

# Pure hues (min channel 0) so that, on a white background, HSV saturation is proportional to how
# much of a pixel the shape covers: the scorer's colour mask is then a coverage map.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 0, 0),
    "yellow": (230, 230, 0),
    "green": (0, 200, 0),
    "cyan": (0, 210, 210),
    "blue": (0, 0, 230),
    "purple": (190, 0, 230),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUND = (255, 255, 255)
NUM_VARIANTS = 4  # jittered renderings per attribute combination (position, size, shade)

_HUES = {c: colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] * 360 for c, rgb in COLOURS.items()}
_CENTRES = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7),
            "center": (0.5, 0.5)}
_RADII = {"small": 0.15, "large": 0.24}  # fraction of the image side
_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """One image of the world: what is drawn, and which jittered rendering of it."""

    colour: str
    shape: str
    size: str
    position: str
    variant: int = 0

    @property
    def name(self) -> str:
        return f"{self.colour}-{self.shape}-{self.size}-{self.position}-v{self.variant}"

    @property
    def combo(self) -> tuple[str, str, str, str]:
        return (self.colour, self.shape, self.size, self.position)

    @classmethod
    def parse(cls, name: str) -> ShapeSpec:
        """The inverse of `.name`; a wrong name gets an error listing the valid words."""
        stem = name[:-4] if name.endswith(".png") else name
        parts = stem.split("-")
        if len(parts) != 5 or not re.fullmatch(r"v\d+", parts[4]):
            raise ValueError(
                f"image name {name!r} is not <colour>-<shape>-<size>-<position>-v<k> "
                f"(example: red-circle-large-left-v0)"
            )
        colour, shape, size, position, v = parts
        for value, choices, what in ((colour, COLOURS, "colour"), (shape, SHAPES, "shape"),
                                     (size, SIZES, "size"), (position, POSITIONS, "position")):
            if value not in choices:
                raise ValueError(f"image name {name!r}: {what} {value!r} is not one of {', '.join(choices)}")
        variant = int(v[1:])
        if variant >= NUM_VARIANTS:
            raise ValueError(f"image name {name!r}: variant must be v0..v{NUM_VARIANTS - 1}")
        return cls(colour, shape, size, position, variant)


def all_combos() -> list[tuple[str, str, str, str]]:
    return [(c, s, z, p) for c in COLOURS for s in SHAPES for z in SIZES for p in POSITIONS]


def is_heldout(combo: tuple[str, str, str, str]) -> bool:
    """A fixed fifth of the (colour, shape, size, position) combinations never appears in training.

    The rule holds out exactly 2 of the 10 (size, position) placements of every (colour, shape)
    pair, so evaluation asks for known colours and shapes in unseen combinations.
    """
    c, s, z, p = combo
    key = list(COLOURS).index(c) + 2 * SHAPES.index(s) + 3 * SIZES.index(z) + POSITIONS.index(p)
    return key % 5 == 0


HELDOUT = [c for c in all_combos() if is_heldout(c)]
TRAIN_COMBOS = [c for c in all_combos() if not is_heldout(c)]


# ----------------------------------------------------------------------------------------------
# Rendering


def _geometry(spec: ShapeSpec) -> tuple[float, float, float, tuple[int, int, int]]:
    """Centre (x, y), radius (all as fractions of the side) and fill colour, jittered per variant."""
    rng = random.Random(f"{spec.combo}-{spec.variant}")
    cx, cy = _CENTRES[spec.position]
    jitter = 0.0 if spec.variant == 0 else 0.03
    cx += rng.uniform(-jitter, jitter)
    cy += rng.uniform(-jitter, jitter)
    r = _RADII[spec.size] * (1.0 + (rng.uniform(-0.08, 0.08) if spec.variant else 0.0))
    shade = 1.0 - (rng.uniform(0.0, 0.12) if spec.variant else 0.0)
    colour = tuple(int(round(v * shade)) for v in COLOURS[spec.colour])
    return cx, cy, r, colour  # type: ignore[return-value]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape in the same units as cx, cy, r (None for a circle)."""
    if shape == "square":
        h = 0.9 * r  # area 3.24 r^2, about the circle's 3.14 r^2
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # pointing up; centroid at (cx, cy + r/3)
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return None


def render_spec(spec: ShapeSpec, size: int = 64) -> Image.Image:
    """The RGB image of `spec` at `size` x `size` pixels."""
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cx, cy, r, colour = _geometry(spec)
    cx, cy, r = cx * big, cy * big, r * big
    poly = _outline(spec.shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(poly, fill=colour)
    return img.resize((size, size), Image.Resampling.BOX)


def render_image(name: str, size: int = 64) -> Image.Image:
    """Render the image named `<colour>-<shape>-<size>-<position>-v<k>` (optionally `.png`)."""
    return render_spec(ShapeSpec.parse(name), size)


@functools.lru_cache(maxsize=4096)
def render_png(name: str, size: int = 64) -> bytes:
    """PNG bytes of `render_image(name, size)` (cached: the server and the bench reuse them)."""
    buf = io.BytesIO()
    render_image(name, size).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Text

_LEADS = (
    "A {size} {colour} {shape} {where}.",
    "Next, a {size} {colour} {shape} {where}.",
    "Here is a {size} {colour} {shape} {where}.",
    "Now draw a {size} {colour} {shape} {where}.",
    "The next picture has a {size} {colour} {shape} {where}.",
    "Picture a {colour} {shape}, {size}, {where}.",
)
_CAPTIONS = (
    "It shows a {size} {colour} {shape}.",
    "That is a {colour} {shape} {where}.",
    "The picture shows a {colour} {shape}.",
    "You can see a {size} {colour} {shape} {where}.",
    "This one is a {colour} {shape}.",
)
_FILLERS = (
    "Shapes are fun to draw.",
    "Let us look at some pictures.",
    "Each picture has one shape.",
    "Colours make shapes easy to tell apart.",
    "We will see a few more.",
    "Some shapes are big and some are small.",
    "Look closely at each one.",
    "That is all for this page.",
)
# The one phrasing of evaluation prompts and of the caption question (a training template too,
# so evaluation measures unseen attribute combinations, not unseen wording).
PROMPT_TEMPLATE = _LEADS[0]


def _fill(template: str, spec: ShapeSpec) -> str:
    return template.format(size=spec.size, colour=spec.colour, shape=spec.shape,
                           where=_POSITION_PHRASE[spec.position])


def describe(spec: ShapeSpec, rng: random.Random | None = None) -> str:
    """A sentence that asks for / introduces the image (text -> image direction)."""
    template = rng.choice(_LEADS) if rng else PROMPT_TEMPLATE
    return _fill(template, spec)


def caption(spec: ShapeSpec, rng: random.Random | None = None) -> str:
    """A sentence that says what an image shows (image -> text direction)."""
    template = rng.choice(_CAPTIONS) if rng else _CAPTIONS[0]
    return _fill(template, spec)


_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\b", re.IGNORECASE)
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b", re.IGNORECASE)


def score_caption(text: str) -> tuple[str | None, str | None]:
    """(colour, shape) first named in `text`; None for a word that is missing."""
    c = _COLOUR_RE.search(text)
    s = _SHAPE_RE.search(text)
    return (c.group(1).lower() if c else None, s.group(1).lower() if s else None)


# ----------------------------------------------------------------------------------------------
# Corpus (MMC4 format)


def random_spec(rng: random.Random, heldout: bool = False) -> ShapeSpec:
    combo = rng.choice(HELDOUT if heldout else TRAIN_COMBOS)
    return ShapeSpec(*combo, variant=rng.randrange(NUM_VARIANTS))


def make_document(rng: random.Random, doc_index: int, image_base_url: str,
                  min_images: int = 2, max_images: int = 4) -> dict[str, Any]:
    """One MMC4 document: fillers, and per image a describing sentence (matched) and a caption."""
    base = image_base_url.rstrip("/")
    text_list: list[str] = []
    matched: list[tuple[ShapeSpec, int]] = []
    if rng.random() < 0.5:
        text_list.append(rng.choice(_FILLERS))
    for _ in range(rng.randint(min_images, max_images)):
        spec = random_spec(rng)
        matched.append((spec, len(text_list)))
        text_list.append(describe(spec, rng))
        text_list.append(caption(spec, rng))
        if rng.random() < 0.25:
            text_list.append(rng.choice(_FILLERS))
    # Similarity as a CLIP scorer would see it: high for the sentences about the image, low else.
    # The matched (describing) sentence names every attribute and scores highest.
    sims = []
    for spec, matched_idx in matched:
        row = []
        for j, sentence in enumerate(text_list):
            c, s = score_caption(sentence)
            hit = (c == spec.colour) + (s == spec.shape) + (j == matched_idx)
            row.append(round(0.12 + 0.07 * hit + rng.uniform(0.0, 0.02), 4))
        sims.append(row)
    image_info = [
        {
            "image_name": f"{spec.name}.png",
            "raw_url": f"{base}/{spec.name}.png",
            "matched_text_index": idx,
            "matched_sim": sims[i][idx],
            "face_detections": None,
        }
        for i, (spec, idx) in enumerate(matched)
    ]
    return {
        "url": f"https://shapes.example/doc/{doc_index:06d}",
        "text_list": text_list,
        "image_info": image_info,
        "similarity_matrix": sims,
        "could_have_url_duplicate": 0,
    }


def make_corpus(num_docs: int, seed: int, image_base_url: str,
                single_image_fraction: float = 0.5) -> list[dict[str, Any]]:
    """`num_docs` MMC4 documents about training combinations only (deterministic by `seed`).

    A `single_image_fraction` of them hold one image (a text-image pair in document form: its
    sentence, the image, its caption); the rest hold 2-4. Pairs matter: with one sentence before
    the dream block, the dream queries learn to read the prompt far sooner than in long documents
    (bench/quality.py: conditions barely depended on the prompt after 700 steps on 2-4 image docs).
    """
    if num_docs < 0:
        raise ValueError(f"num_docs must be >= 0, got {num_docs}")
    if not 0.0 <= single_image_fraction <= 1.0:
        raise ValueError(f"single_image_fraction must be in [0, 1], got {single_image_fraction}")
    rng = random.Random(seed)
    docs = []
    for i in range(num_docs):
        if rng.random() < single_image_fraction:
            docs.append(make_document(rng, i, image_base_url, min_images=1, max_images=1))
        else:
            docs.append(make_document(rng, i, image_base_url))
    return docs


def heldout_prompts(n: int, seed: int = 0) -> list[tuple[str, ShapeSpec]]:
    """`n` (prompt, spec) pairs for text -> image evaluation, all from held-out combinations.

    Cycles through the held-out combinations in a seeded order, so n >= len(HELDOUT) covers all.
    """
    rng = random.Random(seed)
    order = list(HELDOUT)
    rng.shuffle(order)
    specs = [ShapeSpec(*order[i % len(order)], variant=0) for i in range(n)]
    return [(describe(s), s) for s in specs]


def heldout_images(n: int, seed: int = 0, size: int = 64) -> list[tuple[Image.Image, ShapeSpec]]:
    """`n` rendered held-out images (jittered variants) for image -> text evaluation."""
    rng = random.Random(seed + 1)
    order = list(HELDOUT)
    rng.shuffle(order)
    specs = [ShapeSpec(*order[i % len(order)], variant=rng.randrange(NUM_VARIANTS)) for i in range(n)]
    return [(render_spec(s, size), s) for s in specs]


# ----------------------------------------------------------------------------------------------
# Image scorer


def _hsv(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised RGB (H, W, 3 in 0..1) -> hue in degrees, saturation, value."""
    mx = arr.max(-1)
    mn = arr.min(-1)
    delta = mx - mn
    sat = np.where(mx > 1e-6, delta / np.maximum(mx, 1e-6), 0.0)
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    d = np.maximum(delta, 1e-6)
    hue = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return hue * 60.0, sat, mx


def _hue_distance(a: np.ndarray, b: float) -> np.ndarray:
    d = np.abs(a - b) % 360
    return np.minimum(d, 360 - d)


_MIN_SAT = 0.12  # below this a pixel is background (white, grey) or noise
_NAMES = list(COLOURS)
_HUE_ARR = np.array([_HUES[c] for c in _NAMES])


def colour_mask(img: Image.Image) -> tuple[str, np.ndarray]:
    """Dominant colour and its soft coverage mask (H, W in 0..1).

    Each saturated pixel votes for its nearest named hue with its saturation (its coverage on a
    white background); the colour with the most weight wins, and its mask keeps only its pixels.
    """
    arr = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    hue, sat, val = _hsv(arr)
    weight = np.clip(sat - _MIN_SAT, 0.0, None) * (val > 0.15)
    nearest = np.argmin(_hue_distance(hue[..., None], _HUE_ARR[None, None, :]), axis=-1)
    votes = np.bincount(nearest.ravel(), weights=weight.ravel(), minlength=len(_NAMES))
    k = int(np.argmax(votes))
    # Subtracting the floor keeps noise on the background (low saturation) out of the mask.
    mask = np.where(nearest == k, weight / (1.0 - _MIN_SAT), 0.0)
    return _NAMES[k], mask


@functools.lru_cache(maxsize=64)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel sample coordinates (pixel units) for anti-aliased templates at `size`."""
    s = _SUPERSAMPLE
    coords = (np.arange(size * s) + 0.5) / s
    return np.meshgrid(coords, coords)  # type: ignore[return-value]


def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        h = 0.9 * r
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    # triangle (cx, cy - r), (cx + r, cy + r), (cx - r, cy + r): below the apex, within both sides
    t = (y - (cy - r)) / 2.0  # half-width at this height
    return (y <= cy + r) & (y >= cy - r) & (np.abs(x - cx) <= t)


# Area of each shape per r^2, and where its centroid sits below (cx, cy) per r.
_AREA = {"circle": np.pi, "square": 3.24, "triangle": 2.0}
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}
_BLURS = (0.0, 0.7, 1.4, 2.2)
_SCORE_MAX_SIZE = 32  # template blur levels (pixels at 32 px, scaled with the image)


def _template(shape: str, size: int, area: float, mx: float, my: float, blur: float) -> np.ndarray:
    """Coverage of `shape` with the given area (pixels) and centroid, blurred, at `size` px."""
    r = float(np.sqrt(max(area, 1e-3) / _AREA[shape]))
    x, y = _grid(size)
    inside = _inside(shape, x, y, mx, my - _CENTROID_DY[shape] * r, r).astype(np.float64)
    s = _SUPERSAMPLE
    cov = inside.reshape(size, s, size, s).mean(axis=(1, 3))
    if blur > 0:
        im = Image.fromarray((cov * 255).astype(np.uint8))
        cov = np.asarray(im.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64) / 255.0
    return cov


def shape_of_mask(mask: np.ndarray) -> str:
    """The shape whose template (same area and centroid) best correlates with the mask."""
    size = mask.shape[0]
    total = mask.sum()
    if total < 1e-6:
        return SHAPES[0]
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    mx, my = float((mask * xs).sum() / total), float((mask * ys).sum() / total)
    m = mask / (np.linalg.norm(mask) + 1e-9)
    best, best_score = SHAPES[0], -1.0
    for shape in SHAPES:
        for blur in _BLURS:
            t = _template(shape, size, float(total), mx, my, blur * size / 32)
            score = float((m * t).sum() / (np.linalg.norm(t) + 1e-9))
            if score > best_score:
                best, best_score = shape, score
    return best


def score_image(img: Image.Image) -> tuple[str, str]:
    """(colour, shape) of the dominant shape in `img`, at any resolution (16, 32, 64 px...)."""
    side = min(img.size)
    if img.width != img.height or side > _SCORE_MAX_SIZE:
        # Shapes are read at most at 32 px: the templates cost grows with the square of the side.
        side = min(side, _SCORE_MAX_SIZE)
        img = img.resize((side, side), Image.Resampling.BOX)
    colour, mask = colour_mask(img)
    return colour, shape_of_mask(mask)


def degrade(img: Image.Image, size: int, blur: float = 0.0, noise: float = 0.0,
            seed: int = 0) -> Image.Image:
    """Downscale, blur and add Gaussian noise (std in 0..255 units): what generated images look like."""
    out = img.resize((size, size), Image.Resampling.BILINEAR)
    if blur > 0:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    if noise > 0:
        arr = np.asarray(out, dtype=np.float64)
        arr = arr + np.random.default_rng(seed).normal(0.0, noise, arr.shape)
        out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return out


# ----------------------------------------------------------------------------------------------
# Image server


class ImageServer:
    """Serves `render_png(name)` at `http://127.0.0.1:<port>/<name>.png`; anything else is a 404.

    A real ThreadingHTTPServer on a free loopback port, so curation crawls it exactly as it would
    crawl the web. Use as a context manager or call start()/stop().
    """

    def __init__(self, size: int = 64, host: str = "127.0.0.1", port: int = 0) -> None:
        self.size = size
        self.host = host
        self.port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests = 0  # served + refused; lets tests and the demo check the crawler came

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("ImageServer is not started; call start() or use it as a context manager")
        return f"http://{self.host}:{self.port}"

    def start(self) -> ImageServer:
        if self._server is not None:
            return self
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                owner.requests += 1
                name = self.path.split("?", 1)[0].lstrip("/")
                body: bytes | None = None
                if name.endswith(".png"):
                    try:
                        body = render_png(name[:-4], owner.size)
                    except ValueError:
                        body = None
                if body is None:
                    self.send_error(404, "no such image")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet: crawls make thousands
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ImageServer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class QualityReport:
    """Evaluation figures on held-out combinations, each beside its chance level."""

    image_colour_acc: float
    image_shape_acc: float
    caption_acc: float  # colour AND shape named correctly
    caption_colour_acc: float
    caption_shape_acc: float
    num_prompts: int
    num_images: int
    chance_colour: float = 1.0 / len(COLOURS)
    chance_shape: float = 1.0 / len(SHAPES)
    chance_caption: float = 1.0 / (len(COLOURS) * len(SHAPES))
    samples: list[dict[str, Any]] | None = None  # a few (prompt, read) and (truth, caption) examples

    def lines(self) -> list[str]:
        return [
            f"text->image colour   {self.image_colour_acc:6.1%}  (chance {self.chance_colour:.1%}, "
            f"{self.num_prompts} held-out prompts)",
            f"text->image shape    {self.image_shape_acc:6.1%}  (chance {self.chance_shape:.1%})",
            f"image->text colour+shape {self.caption_acc:6.1%}  (chance {self.chance_caption:.1%}, "
            f"{self.num_images} held-out images; colour {self.caption_colour_acc:.1%}, "
            f"shape {self.caption_shape_acc:.1%})",
        ]


def evaluate(model: Any, tokenizer: Any, num_prompts: int = len(HELDOUT), num_images: int = len(HELDOUT),
             seed: int = 0, guidance_scale: float | None = None, num_inference_steps: int | None = None,
             batch_size: int = 64) -> QualityReport:
    """Score a DreamLLM on held-out combinations: text -> image (colour, shape) and image -> text.

    Images are read by `score_image` at the decoder's resolution; captions (greedy) by
    `score_caption`. Both go through dreamcore.engine, the engine the served endpoint runs.
    Imports it lazily so this module stays light for the image server.
    """
    import torch

    from dreamcore.engine import TextEngine
    from dreamcore.generate import caption_images, text_to_images

    was_training = model.training
    model.eval()
    samples: list[dict[str, Any]] = []
    with torch.inference_mode():
        engine = TextEngine(model, tokenizer)
        prompts = heldout_prompts(num_prompts, seed)
        colour_hits = shape_hits = 0
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            images = text_to_images(model, tokenizer, [p for p, _ in chunk], seed=seed + start,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    engine=engine)
            for (prompt, spec), img in zip(chunk, images):
                colour, shape = score_image(img)
                colour_hits += colour == spec.colour
                shape_hits += shape == spec.shape
                if len(samples) < 6:
                    samples.append({"prompt": prompt, "read": [colour, shape]})
        cases = heldout_images(num_images, seed)
        both = c_hits = s_hits = 0
        for start in range(0, len(cases), batch_size):
            chunk = cases[start:start + batch_size]
            texts = caption_images(model, tokenizer, [img for img, _ in chunk], max_new_tokens=16, engine=engine)
            for (_, spec), text in zip(chunk, texts):
                colour, shape = score_caption(text)
                c_hits += colour == spec.colour
                s_hits += shape == spec.shape
                both += colour == spec.colour and shape == spec.shape
                if len(samples) < 12:
                    samples.append({"image": spec.name, "caption": text})
    model.train(was_training)
    n_p, n_i = max(len(prompts), 1), max(len(cases), 1)
    return QualityReport(colour_hits / n_p, shape_hits / n_p, both / n_i, c_hits / n_i, s_hits / n_i,
                         len(prompts), len(cases), samples=samples)
