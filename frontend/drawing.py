"""The evidence-box drawing surface of the Inspect tab: a ``gr.HTML`` with a few lines of pointer handling.

Why our own: gradio-image-annotation 0.5.6 under Gradio 6.31 in Chromium leaves a zero-size box at the press point
and ignores the drag (its canvas is wider than the image, centred in it, and its hit-testing misses), so the
studio's central gesture did not work. This surface is an ``<img>`` scaled by CSS with the box as a
percent-positioned ``<div>`` over it, so what is drawn and where it lands need no canvas geometry at all:

* press on the image and drag: a new box; press inside the box: move it; press a corner handle: resize it
  (a resize is a new drag from the opposite corner);
* a click without a drag changes nothing (the old failure mode: a click collapsing the box to a point);
* on release the box, in pixels of the *original* image, goes to Python as the data of an ``input`` event
  (``gr.EventData``), never as an echo of a value set by Python, so typed numbers are never overwritten.

Everything Python renders here is pure (``surface_html``) and unit-tested; the JavaScript is the only browser part
and is covered by a browser test that drags with the mouse.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

from PIL import Image

# Small images are shown enlarged so a 24 px box is easy to draw; large ones are shown at most this wide.
MIN_DISPLAY_LONG_SIDE = 384
MAX_DISPLAY_LONG_SIDE = 720
# The image copy sent to the browser: only for display, so a 12-megapixel photo does not travel in full.
MAX_SENT_LONG_SIDE = 1024

Box = tuple[float, float, float, float]

SURFACE_CSS = """
.vopd-surface { position: relative; display: inline-block; max-width: 100%; cursor: crosshair; touch-action: none;
  user-select: none; -webkit-user-select: none; line-height: 0; }
.vopd-surface img { display: block; width: 100%; height: auto; pointer-events: none; }
.vopd-surface.pixelated img { image-rendering: pixelated; }
.vopd-box { position: absolute; box-sizing: border-box; border: 2px solid rgb(255, 0, 0);
  background: rgba(255, 0, 0, 0.12); cursor: move; }
.vopd-box.hidden { display: none; }
.vopd-handle { position: absolute; width: 12px; height: 12px; background: #fff; border: 2px solid rgb(255, 0, 0);
  box-sizing: border-box; border-radius: 2px; }
.vopd-handle[data-corner=nw] { left: -7px; top: -7px; cursor: nwse-resize; }
.vopd-handle[data-corner=ne] { right: -7px; top: -7px; cursor: nesw-resize; }
.vopd-handle[data-corner=sw] { left: -7px; bottom: -7px; cursor: nesw-resize; }
.vopd-handle[data-corner=se] { right: -7px; bottom: -7px; cursor: nwse-resize; }
.vopd-evidence { position: absolute; box-sizing: border-box; border: 2px dashed rgb(37, 99, 235);
  pointer-events: none; }
.vopd-evidence span { position: absolute; left: -2px; bottom: 100%; line-height: 1.3; font-size: 12px;
  white-space: nowrap; color: #fff; background: rgb(37, 99, 235); padding: 1px 4px; border-radius: 3px 3px 0 0; }
.vopd-empty { display: flex; align-items: center; justify-content: center; min-height: 180px; line-height: 1.4;
  border: 2px dashed #8886; border-radius: 8px; color: #777; padding: 16px; text-align: center; }
"""

# Runs once per mounted component (``element`` is its root, ``trigger`` sends an event to Python). Listeners sit on the
# root and look the surface up on every event, so a re-render by Python (a new image, a typed box) never orphans them.
SURFACE_JS = r"""
let drag = null;
const surface = () => element.querySelector('.vopd-surface');
const pointOf = (ev, s) => {
  const r = s.getBoundingClientRect(), w = +s.dataset.width, h = +s.dataset.height;
  const x = (ev.clientX - r.left) / r.width * w, y = (ev.clientY - r.top) / r.height * h;
  return [Math.min(w, Math.max(0, x)), Math.min(h, Math.max(0, y))];
};
const currentBox = (s) => (s.dataset.box ? s.dataset.box.split(',').map(Number) : null);
const paint = (s, b) => {
  const el = s.querySelector('.vopd-box'), w = +s.dataset.width, h = +s.dataset.height;
  el.classList.remove('hidden');
  el.style.left = (b[0] / w * 100) + '%'; el.style.top = (b[1] / h * 100) + '%';
  el.style.width = ((b[2] - b[0]) / w * 100) + '%'; el.style.height = ((b[3] - b[1]) / h * 100) + '%';
};
element.addEventListener('pointerdown', (ev) => {
  const s = surface();
  if (!s || ev.button !== 0 || !s.contains(ev.target)) return;
  ev.preventDefault();
  const p = pointOf(ev, s), box = currentBox(s), corner = ev.target.dataset ? ev.target.dataset.corner : null;
  if (corner && box) {  // resizing = drawing anew from the opposite corner
    const ax = corner.includes('w') ? box[2] : box[0], ay = corner.includes('n') ? box[3] : box[1];
    drag = {mode: 'draw', start: [ax, ay], moved: true};
  } else if (box && ev.target.classList.contains('vopd-box')) {
    drag = {mode: 'move', start: p, origin: box, moved: false};
  } else {
    drag = {mode: 'draw', start: p, moved: false, sx: ev.clientX, sy: ev.clientY};
  }
  drag.previous = box;
  s.setPointerCapture(ev.pointerId);
});
element.addEventListener('pointermove', (ev) => {
  const s = surface();
  if (!drag || !s) return;
  const p = pointOf(ev, s), w = +s.dataset.width, h = +s.dataset.height;
  let b;
  if (drag.mode === 'move') {
    const bw = drag.origin[2] - drag.origin[0], bh = drag.origin[3] - drag.origin[1];
    const x0 = Math.min(w - bw, Math.max(0, drag.origin[0] + p[0] - drag.start[0]));
    const y0 = Math.min(h - bh, Math.max(0, drag.origin[1] + p[1] - drag.start[1]));
    b = [x0, y0, x0 + bw, y0 + bh];
    drag.moved = drag.moved || p[0] !== drag.start[0] || p[1] !== drag.start[1];
  } else {
    if (!drag.moved && Math.hypot(ev.clientX - drag.sx, ev.clientY - drag.sy) < 4) return;
    drag.moved = true;
    b = [Math.min(drag.start[0], p[0]), Math.min(drag.start[1], p[1]),
         Math.max(drag.start[0], p[0]), Math.max(drag.start[1], p[1])];
  }
  drag.box = b;
  paint(s, b);
});
const finish = (ev) => {
  const s = surface(), d = drag;
  drag = null;
  if (!d || !s) return;
  const b = d.box ? d.box.map(Math.round) : null;
  if (!d.moved || !b || b[2] - b[0] < 1 || b[3] - b[1] < 1) {  // a click, or a box too small to mean anything
    if (d.previous) paint(s, d.previous);
    return;
  }
  s.dataset.box = b.join(',');
  paint(s, b);
  trigger('input', {box: b});
};
element.addEventListener('pointerup', finish);
element.addEventListener('pointercancel', finish);
"""


def display_width(size: tuple[int, int]) -> int:
    """CSS width of the shown image: small images enlarged to ~384 px on the long side, large ones capped."""
    width, height = size
    long_side = max(width, height, 1)
    if long_side < MIN_DISPLAY_LONG_SIDE:
        scale = MIN_DISPLAY_LONG_SIDE / long_side
    else:
        scale = min(1.0, MAX_DISPLAY_LONG_SIDE / long_side)
    return max(1, round(width * scale))


def image_data_url(image: Image.Image) -> str:
    """A PNG data URL of the image (downscaled past MAX_SENT_LONG_SIDE: the browser only shows it)."""
    shown = image.convert("RGB")
    if max(shown.size) > MAX_SENT_LONG_SIDE:
        shown = shown.copy()
        shown.thumbnail((MAX_SENT_LONG_SIDE, MAX_SENT_LONG_SIDE))
    buffer = io.BytesIO()
    shown.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _percent_style(box: Sequence[float], size: tuple[int, int]) -> str:
    width, height = size
    x0, y0, x1, y1 = box
    return (
        f"left:{x0 / width * 100:.4f}%;top:{y0 / height * 100:.4f}%;"
        f"width:{(x1 - x0) / width * 100:.4f}%;height:{(y1 - y0) / height * 100:.4f}%"
    )


def empty_html(message: str) -> str:
    return f'<div class="vopd-empty">{html.escape(message)}</div>'


def surface_html(
    image: Image.Image | None,
    box: Box | None,
    *,
    evidence: Box | None = None,
    evidence_label: str = "",
    empty_message: str = "",
    alt: str = "",
) -> str:
    """The drawing surface for ``image`` with the red ``box`` (None: no box shown) and, when given, the model's own
    ``evidence`` box drawn dashed with its label. Coordinates are pixels of the original image."""
    if image is None:
        return empty_html(empty_message)
    size = image.size
    pixelated = " pixelated" if max(size) * 2 <= MIN_DISPLAY_LONG_SIDE else ""
    box_attr = ",".join(str(round(v)) for v in box) if box is not None else ""
    box_style = _percent_style(box, size) if box is not None else ""
    handles = "".join(f'<div class="vopd-handle" data-corner="{c}"></div>' for c in ("nw", "ne", "sw", "se"))
    parts = [
        f'<div class="vopd-surface{pixelated}" data-width="{size[0]}" data-height="{size[1]}" '
        f'data-box="{box_attr}" style="width:{display_width(size)}px">',
        f'<img src="{image_data_url(image)}" alt="{html.escape(alt)}" draggable="false">',
        f'<div class="vopd-box{"" if box is not None else " hidden"}" style="{box_style}">{handles}</div>',
    ]
    if evidence is not None:
        parts.append(
            f'<div class="vopd-evidence" style="{_percent_style(evidence, size)}">'
            f"<span>{html.escape(evidence_label)}</span></div>"
        )
    parts.append("</div>")
    return "".join(parts)


def box_from_event(data: object) -> Box | None:
    """The box of a drawing ``input`` event's data (``{"box": [x0, y0, x1, y1]}``), or None when malformed."""
    box = data.get("box") if isinstance(data, dict) else None
    if not isinstance(box, list | tuple) or len(box) != 4:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None
