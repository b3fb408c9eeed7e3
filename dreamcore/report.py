"""HTML rendering of interleaved documents, shared by `dreamcore generate` and the demo report.

Plain, self-contained HTML: text is escaped, images are embedded as base64 PNG `data:` URLs, so
one file can be mailed or opened offline. A document is a list of parts in order; a part is
text (`str`), an image (PNG/JPEG `bytes` or a PIL image), or an endpoint's JSON part
(`{"type": "text", "text": ...}` / `{"type": "image", "image": <base64>}`). No torch, no Ray:
the HTTP client imports this module.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.5; }
h1, h2, h3 { font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(16rem, 1fr)); gap: 0 1rem; }
.doc { border: 1px solid #ddd; border-radius: 6px; padding: 1rem; margin: 1rem 0; }
.doc .prompt { color: #666; }
.doc .text { white-space: pre-wrap; }
.doc img { image-rendering: pixelated; width: 128px; height: auto; margin: .5rem 0;
           border: 1px solid #ccc; display: block; }
table { border-collapse: collapse; margin: 1rem 0; }
td, th { border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; }
th { background: #f6f6f6; }
.meta { color: #666; font-size: .9em; }
"""


def png_b64(image: Any) -> str:
    """Base64 of an image part: bytes as given (PNG/JPEG), a PIL image or (H, W, 3) uint8 array as PNG."""
    if isinstance(image, (bytes, bytearray)):
        return base64.b64encode(bytes(image)).decode("ascii")
    if hasattr(image, "__array_interface__") and not hasattr(image, "save"):  # numpy, without importing it
        from PIL import Image

        image = Image.fromarray(image)
    if hasattr(image, "save"):  # PIL.Image.Image, without importing PIL for the client
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")
    raise TypeError(f"cannot render {type(image).__name__} as an image part (need bytes or a PIL image)")


def _mime(b64: str) -> str:
    return "image/jpeg" if b64.startswith("/9j/") else "image/png"  # JPEG magic FF D8 FF in base64


def img_tag(b64: str, alt: str = "generated image") -> str:
    return f'<img src="data:{_mime(b64)};base64,{b64}" alt="{html.escape(alt)}">'


def part_html(part: Any) -> str:
    """One part of a document as HTML (text escaped, image embedded)."""
    if isinstance(part, str):
        return f'<div class="text">{html.escape(part)}</div>'
    if isinstance(part, Mapping):
        kind = part.get("type")
        if kind == "text":
            return part_html(str(part.get("text", "")))
        if kind == "image":
            return img_tag(str(part["image"]), alt=f"image, seed {part.get('seed', '?')}")
        raise ValueError(f"unknown part type {kind!r}; expected 'text' or 'image'")
    return img_tag(png_b64(part))


def document_html(parts: Iterable[Any], title: str | None = None, prompt: str | None = None,
                  meta: str | None = None) -> str:
    """A document as an HTML fragment (`<section class="doc">`)."""
    out = ['<section class="doc">']
    if title:
        out.append(f"<h3>{html.escape(title)}</h3>")
    if prompt is not None:
        out.append(f'<div class="prompt">Prompt: {html.escape(prompt)}</div><hr>')
    out.extend(part_html(p) for p in parts)
    if meta:
        out.append(f'<div class="meta">{html.escape(meta)}</div>')
    out.append("</section>")
    return "\n".join(out)


def table_html(rows: Sequence[Mapping[str, Any]] | Mapping[str, Any], caption: str | None = None) -> str:
    """A table from a mapping (two columns: key, value) or from rows of mappings (one column per key)."""
    if isinstance(rows, Mapping):
        rows = [{"name": k, "value": v} for k, v in rows.items()]
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows
    )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_png(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str,
             xlabel: str = "step", ylabel: str = "loss") -> bytes:
    """A line plot (one line per named (x, y) series) as PNG bytes; matplotlib only when called."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def figure_html(png: bytes, alt: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}" style="width:100%;max-width:40rem">'


def page_html(title: str, sections: Iterable[str]) -> str:
    """A whole HTML page around already-rendered fragments."""
    body = "\n".join(sections)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def write_document(path: str | Path, parts: Iterable[Any], title: str = "dreamcore document",
                   prompt: str | None = None, meta: str | None = None) -> Path:
    """Write one document as a standalone HTML file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page_html(title, [document_html(parts, prompt=prompt, meta=meta)]), encoding="utf-8")
    return path
