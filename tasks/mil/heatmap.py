"""Attention heatmaps a pathologist can read: the slide thumbnail with each patch's MIL attention as a colour overlay,
a colour bar with its scale, the top-attended patches beside it at full size, and label / prediction in the title.

Colour is the attention min-max scaled over the slide's patches (0 = least attended, 1 = most), and the colour bar
prints raw attention values, so colour means the same thing as the number the model produced: a region lights up
only where the model put its attention. Rank (percentile) scaling, CLAM's choice, was rejected: it always paints half
the tissue in the upper half of the colormap, which reads as "the model looked at half the slide" even when its
attention sits on a few patches. The cost of min-max: when one patch takes nearly all the attention, the others all
look cold; the top-k panel then still shows the runners-up with their values. The colormap is
viridis (perceptually uniform, readable by colour-blind viewers, and its dark-purple-to-yellow ramp never looks like
the pink and purple of H&E). The overlay is semi-transparent so the tissue stays visible below it.

With ``random_weights`` (features or the MIL model came from random weights) a red RANDOM WEIGHTS band sits above the
figure: the attention it shows is noise, and the picture says so where it is looked at.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tasks.clip.metrics import text_image
from tasks.slides.pictures import fit_picture, outlined_box, random_weights_banner

OVERLAY_ALPHA = 0.5  # half tissue, half colour: both stay legible
PATCH_CELL_PX = 256  # top-k patches shown at least this big so nuclei and cells are visible
THUMBNAIL_MAX_PX = 1024
_PAD = 10
_FONT_SIZE = 15
_BAR_WIDTH = 28
_BAR_TICKS = (1.0, 0.75, 0.5, 0.25, 0.0)
_GRID_COLUMNS = 2

PatchSource = Sequence[np.ndarray] | Callable[[int], np.ndarray]


@dataclass(frozen=True)
class HeatmapFigure:
    """The composed RGB figure and where the thumbnail sits in it (top-left pixel, thumbnail px per input px)."""

    image: np.ndarray
    thumbnail_origin: tuple[int, int]
    thumbnail_scale: float


def minmax_scale(attention: np.ndarray) -> np.ndarray:
    """Attention scaled to [0, 1] between the slide's least and most attended patch; a slide whose patches all got the
    same attention is painted mid-scale (0.5), so no patch looks singled out."""
    low, high = float(attention.min()), float(attention.max())
    if high - low <= 1e-12 * max(abs(high), 1e-30):
        return np.full(len(attention), 0.5)
    return (attention - low) / (high - low)


def viridis(values: np.ndarray) -> np.ndarray:
    """RGB uint8 colours (N x 3) of values in [0, 1] on the viridis colormap."""
    levels = np.clip(np.round(np.asarray(values, float) * 255), 0, 255).astype(np.uint8).reshape(-1, 1)
    return cv2.applyColorMap(levels, cv2.COLORMAP_VIRIDIS)[:, 0, ::-1].copy()  # OpenCV gives BGR


def validate_inputs(
    thumbnail: np.ndarray, downsample: float, boxes: np.ndarray, attention: np.ndarray, patches: PatchSource
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N x 4) and attention (N,) as float arrays, or a ValueError naming the input that is wrong and why."""
    thumbnail = np.asarray(thumbnail)
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or min(thumbnail.shape[:2]) < 1:
        raise ValueError(f"thumbnail must be an RGB array of shape (H, W, 3), got shape {thumbnail.shape}")
    if not np.isfinite(downsample) or downsample <= 0:
        raise ValueError(f"downsample must be a positive number (level-0 px per thumbnail px), got {downsample}")
    boxes = np.asarray(boxes, dtype=float)
    attention = np.asarray(attention, dtype=float)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
        raise ValueError(f"boxes must be an N x 4 array of level-0 (x, y, w, h) with N >= 1, got shape {boxes.shape}")
    if not np.isfinite(boxes).all() or (boxes[:, 2:] <= 0).any():
        bad = np.flatnonzero(~np.isfinite(boxes).all(axis=1) | (boxes[:, 2:] <= 0).any(axis=1))
        raise ValueError(f"boxes must be finite with positive width and height; {len(bad)} are not, first at {bad[0]}")
    if attention.shape != (len(boxes),):
        raise ValueError(f"attention must have shape ({len(boxes)},), one value per box; got shape {attention.shape}")
    if not np.isfinite(attention).all():
        bad = np.flatnonzero(~np.isfinite(attention))
        raise ValueError(f"attention must be finite; {len(bad)} value(s) are NaN or inf, first at index {bad[0]}")
    if not callable(patches) and len(patches) != len(boxes):
        raise ValueError(f"patches must hold one image per box ({len(boxes)}) or be a callable; got {len(patches)}")
    return boxes, attention


def validate_call(probability: float, top_k: int) -> None:
    """A ValueError naming ``probability`` or ``top_k`` when the title or the panel could not be drawn honestly."""
    if not 0.0 <= probability <= 1.0:  # also rejects NaN
        raise ValueError(f"probability must be the predicted class's probability in [0, 1], got {probability}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1 (patches shown beside the slide), got {top_k}")


def _text_image(text: str, size: int = _FONT_SIZE) -> Image.Image:
    return text_image(text, ImageFont.load_default(size=size), margin=2)


def overlay_attention(image: np.ndarray, factor: float, boxes: np.ndarray, scaled: np.ndarray) -> np.ndarray:
    """Each box tinted with its scaled attention's colour at OVERLAY_ALPHA; where boxes overlap the more attended one
    wins (painted last). Pixels outside every box keep the thumbnail's own colour."""
    colours = viridis(scaled)
    layer = np.zeros_like(image)
    covered = np.zeros(image.shape[:2], bool)
    for i in np.argsort(scaled, kind="stable"):
        x, y, w, h = boxes[i] * factor
        x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
        x1, y1 = min(image.shape[1], int(round(x + w))), min(image.shape[0], int(round(y + h)))
        layer[y0:y1, x0:x1] = colours[i]
        covered[y0:y1, x0:x1] = True
    blended = image.astype(np.float32)
    blended[covered] = blended[covered] * (1 - OVERLAY_ALPHA) + layer[covered].astype(np.float32) * OVERLAY_ALPHA
    return blended.round().astype(np.uint8)


def _mark_top(image: np.ndarray, factor: float, boxes: np.ndarray, top: np.ndarray) -> None:
    """Numbered white-edged outlines on the top-k boxes, so each panel patch can be found on the slide."""
    line = max(2, round(max(image.shape[:2]) / 400))
    for rank, i in enumerate(top, start=1):
        x, y, w, h = boxes[i] * factor
        p0, p1 = (int(x), int(y)), (int(x + w), int(y + h))
        outlined_box(image, p0, p1, (230, 30, 30), line)
        cv2.putText(image, str(rank), (p0[0] + line + 1, p0[1] + 14 + line), 0, 0.5, (255, 255, 255), 3, cv2.LINE_AA)
        cv2.putText(image, str(rank), (p0[0] + line + 1, p0[1] + 14 + line), 0, 0.5, (230, 30, 30), 1, cv2.LINE_AA)


def colour_bar(height: int, attention: np.ndarray) -> Image.Image:
    """A vertical viridis bar, most attended at the top, ticked with the raw attention at 0-100% of its range."""
    height = max(height, 160)
    ramp = viridis(np.linspace(1.0, 0.0, height))
    bar = np.repeat(ramp[:, None, :], _BAR_WIDTH, axis=1)
    low, high = float(attention.min()), float(attention.max())
    labels = [_text_image(f"{low + q * (high - low):.3g}", 13) for q in _BAR_TICKS]
    header = _text_image("attention (min-max)", 13)
    width = _BAR_WIDTH + 6 + max(im.width for im in labels)
    panel = Image.new("RGB", (max(width, header.width), height + header.height + 16), "white")
    panel.paste(header, (0, 0))
    top = header.height + 8
    panel.paste(Image.fromarray(bar), (0, top))
    draw = ImageDraw.Draw(panel)
    for q, label in zip(_BAR_TICKS, labels, strict=True):
        y = top + round((1.0 - q) * (height - 1))
        draw.line([(_BAR_WIDTH, y), (_BAR_WIDTH + 4, y)], fill="black", width=1)
        panel.paste(label, (_BAR_WIDTH + 6, min(max(top, y - label.height // 2), top + height - label.height)))
    return panel


def _patch_image(patches: PatchSource, index: int) -> np.ndarray:
    patch = np.asarray(patches(index) if callable(patches) else patches[index])
    if patch.ndim != 3 or patch.shape[2] != 3:
        raise ValueError(f"patch image for box {index} must be RGB (H, W, 3), got shape {patch.shape}")
    return patch.astype(np.uint8, copy=False)


def top_patch_panel(patches: PatchSource, top: np.ndarray, attention: np.ndarray) -> Image.Image:
    """The top-k patches, most attended first, in reading order, each PATCH_CELL_PX wide (upscaled with nearest
    neighbour when smaller, so no detail is invented) with its rank, raw attention and share of the total under it."""
    cells = []
    for rank, i in enumerate(top, start=1):
        patch = _patch_image(patches, int(i))
        scale = PATCH_CELL_PX / max(patch.shape[:2])
        size = (max(1, round(patch.shape[1] * scale)), max(1, round(patch.shape[0] * scale)))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
        tile = Image.fromarray(cv2.resize(patch, size, interpolation=interpolation))
        share = attention[i] / attention.sum() if attention.sum() > 0 else float("nan")
        caption = _text_image(f"#{rank}  attention {attention[i]:.4g}  ({share:.1%} of total)", 13)
        cell = Image.new("RGB", (PATCH_CELL_PX, PATCH_CELL_PX + caption.height + 4), "white")
        cell.paste(tile, ((PATCH_CELL_PX - tile.width) // 2, (PATCH_CELL_PX - tile.height) // 2))
        cell.paste(caption, (0, PATCH_CELL_PX + 2))
        cells.append(cell)
    header = _text_image(f"top {len(top)} attended patches (red numbers on the slide)", 13)
    cols = min(_GRID_COLUMNS, len(cells))
    rows = -(-len(cells) // cols)
    cell_h = cells[0].height
    panel = Image.new("RGB", (cols * (PATCH_CELL_PX + _PAD), header.height + 6 + rows * (cell_h + _PAD)), "white")
    panel.paste(header, (0, 0))
    for n, cell in enumerate(cells):
        panel.paste(cell, ((n % cols) * (PATCH_CELL_PX + _PAD), header.height + 6 + (n // cols) * (cell_h + _PAD)))
    return panel


def title_text(slide_id: str, label: str, prediction: str, probability: float) -> str:
    verdict = "correct" if label == prediction else "WRONG"
    return f"{slide_id}   label: {label}   prediction: {prediction} (p={probability:.2f}, {verdict})"


def draw_heatmap(
    thumbnail: np.ndarray,
    downsample: float,
    boxes: np.ndarray,
    attention: np.ndarray,
    patches: PatchSource,
    label: str,
    prediction: str,
    probability: float,
    slide_id: str,
    top_k: int = 6,
    random_weights: bool = False,
) -> HeatmapFigure:
    """The heatmap figure (see the module docstring) and where its thumbnail sits; ``render_heatmap`` encodes it.

    ``thumbnail`` is the slide overview (RGB), ``downsample`` level-0 px per thumbnail px, ``boxes`` the patches'
    level-0 (x, y, w, h) and ``attention`` one finite value per box. ``patches`` gives patch images by box index:
    a sequence with one image per box, or a callable (so only the top ``top_k`` are read from the slide).
    ``probability`` is the model's probability of ``prediction``. Bad input raises a ValueError naming it."""
    boxes, attention = validate_inputs(thumbnail, downsample, boxes, attention, patches)
    validate_call(probability, top_k)
    scaled = minmax_scale(attention)
    top = np.argsort(-attention, kind="stable")[:top_k]
    image, scale = fit_picture(np.asarray(thumbnail), THUMBNAIL_MAX_PX)
    factor = scale / downsample
    image = overlay_attention(image, factor, boxes, scaled)
    _mark_top(image, factor, boxes, top)
    parts = [Image.fromarray(image), colour_bar(image.shape[0], attention), top_patch_panel(patches, top, attention)]
    title = _text_image(title_text(slide_id, label, prediction, probability), 18)
    width = max(title.width, sum(p.width for p in parts) + _PAD * (len(parts) - 1)) + 2 * _PAD
    body_y = _PAD + title.height + _PAD
    figure = Image.new("RGB", (width, body_y + max(p.height for p in parts) + _PAD), "white")
    figure.paste(title, (_PAD, _PAD))
    x = _PAD
    for part in parts:
        figure.paste(part, (x, body_y))
        x += part.width + _PAD
    pixels = np.asarray(figure)
    origin_y = body_y
    if random_weights:
        pixels = random_weights_banner(pixels, "attention is noise")
        origin_y += pixels.shape[0] - figure.height
    return HeatmapFigure(pixels, (_PAD, origin_y), scale)


def render_heatmap(*args, **kwargs) -> bytes:
    """The attention heatmap of one slide as PNG bytes; the arguments are those of :func:`draw_heatmap`."""
    buffer = io.BytesIO()
    Image.fromarray(draw_heatmap(*args, **kwargs).image).save(buffer, format="PNG")
    return buffer.getvalue()
