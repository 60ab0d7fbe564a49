"""A self-contained HTML report: a title and a list of sections, each ``(title, html)``.

Images are embedded as base64 PNG (``image_html``, ``figure_html``), so the one file can
be mailed or archived. Producers of sections (the demo, pixel flipping, SpRAy, ...) return
``Section`` tuples; ``write_report`` puts them in order under a table of contents:

    sections = [("Heatmaps", image_html(grid_pixels, "heatmaps")), ("Notes", "<p>...</p>")]
    write_report("report.html", "My run", sections)
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import viz

Section = tuple  # (title: str, body: str of HTML)

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72em; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 0.2em 0.7em; border-bottom: 1px solid #eee; }
th { text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { image-rendering: pixelated; max-width: 100%; } .note { color: #555; font-size: 0.9em; }
"""


def image_html(pixels: np.ndarray, alt: str) -> str:
    """An <img> with the uint8 [H, W, 3] image embedded as a base64 PNG."""
    data = base64.b64encode(viz.png_bytes(pixels)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def figure_html(figure, alt: str, dpi: int = 100, tight: bool = True) -> str:
    """An <img> with a matplotlib Figure embedded as a base64 PNG. ``tight`` crops the margins;
    without it the picture is exactly the figure's size times ``dpi``."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table_html(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A table; numbers are right-aligned, floats shown with 3 significant digits."""
    def cell(value):
        if isinstance(value, float):
            return f'<td class="num">{value:.3g}</td>'
        if isinstance(value, int) and not isinstance(value, bool):
            return f'<td class="num">{value}</td>'
        return f"<td>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(title: str, sections: Sequence[Section], intro: str = "") -> str:
    """The HTML text of the report."""
    anchors = [f"section-{k}" for k in range(len(sections))]
    toc = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, (t, _) in zip(anchors, sections))
    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
             f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>", intro,
             f"<ol>{toc}</ol>"]
    for anchor, (section_title, body) in zip(anchors, sections):
        parts.append(f'<section id="{anchor}"><h2>{html.escape(section_title)}</h2>{body}</section>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(path: str | Path, title: str, sections: Sequence[Section], intro: str = "") -> Path:
    """Write the report to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    path.write_text(render_report(title, sections, intro), encoding="utf-8")
    return path
