"""Colour control: keep the content's colours (Gatys, Bethge, Hertzmann & Shechtman 2016, "Preserving Color
in Neural Artistic Style Transfer", arXiv:1606.05897).

* ``luminance``: the transfer runs on luminance images (Y of YIQ, replicated to three channels; the style's
  luminance mean and standard deviation matched to the content's); the result's luminance is then combined
  with the content's I and Q channels (section 2.2 of the paper).
* ``match_style_colors``: each style image's pixels are mapped by ``x -> A (x - mu_S) + mu_C`` with
  ``A = Sigma_C^(1/2) Sigma_S^(-1/2)`` (the paper's "image analogies" variant, section 2.1) before transfer.

Both are safe on grayscale images: variances and covariance eigenvalues are floored at ``EPS`` (pixel
levels^2), so no division by zero and no NaN.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: NTSC RGB -> YIQ (rows Y, I, Q); RGB in any consistent unit.
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                       [0.595716, -0.274453, -0.321263],
                       [0.211456, -0.522591, 0.311135]])
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ)

#: Floor of variances and covariance eigenvalues, pixel levels^2.
EPS = 1e-3


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)            # (H, W, 3) 0..255


def _to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "RGB")


def luminance(array: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` RGB to ``(H, W)`` Y of YIQ, same units."""
    return array @ RGB_TO_YIQ[0]


def _sqrtm(cov: np.ndarray, inverse: bool = False) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    values = np.maximum(values, EPS)
    power = -0.5 if inverse else 0.5
    return (vectors * values**power) @ vectors.T


def match_colors(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map ``source`` pixels so their mean and covariance equal ``reference``'s.

    Args:
        source, reference: ``(H, W, 3)`` float64 RGB pixel levels.
    Returns:
        ``(H, W, 3)`` float64, not clipped.
    """
    src, ref = source.reshape(-1, 3), reference.reshape(-1, 3)
    mu_s, mu_r = src.mean(0), ref.mean(0)
    cov_s = np.cov(src, rowvar=False) if len(src) > 1 else np.zeros((3, 3))
    cov_r = np.cov(ref, rowvar=False) if len(ref) > 1 else np.zeros((3, 3))
    transform = _sqrtm(cov_r) @ _sqrtm(cov_s, inverse=True)
    return ((src - mu_s) @ transform.T + mu_r).reshape(source.shape)


class ColorControl:
    """Per-job colour handling around the optimisation.

    Args:
        mode: ``"none"``, ``"luminance"`` or ``"match_style_colors"``.
        content: the content image (8-bit RGB, original size).
    Raises:
        ValueError: unknown mode.
    """

    def __init__(self, mode: str, content: Image.Image) -> None:
        if mode not in ("none", "luminance", "match_style_colors"):
            raise ValueError(f"color_control must be none, luminance or match_style_colors, got {mode!r}")
        self.mode = mode
        self._content = content
        self._content_pixels = _pixels(content) if mode != "none" else None
        if mode == "luminance":
            y = luminance(self._content_pixels)
            self._y_mean, self._y_std = float(y.mean()), float(np.sqrt(max(y.var(), EPS)))

    def content(self) -> Image.Image:
        """The content image the optimisation sees."""
        if self.mode != "luminance":
            return self._content
        return _to_image(np.repeat(luminance(self._content_pixels)[..., None], 3, axis=2))

    def style(self, image: Image.Image) -> Image.Image:
        """A style (or initial) image as the optimisation sees it."""
        if self.mode == "none":
            return image
        pixels = _pixels(image)
        if self.mode == "match_style_colors":
            return _to_image(match_colors(pixels, self._content_pixels))
        y = luminance(pixels)
        y = (y - y.mean()) / np.sqrt(max(y.var(), EPS)) * self._y_std + self._y_mean
        return _to_image(np.repeat(y[..., None], 3, axis=2))

    def finish(self, array: np.ndarray) -> np.ndarray:
        """The optimised ``(H, W, 3)`` uint8 image as delivered: with ``luminance``, its Y combined with the
        content's I and Q at the same size; otherwise unchanged."""
        if self.mode != "luminance":
            return array
        height, width = array.shape[:2]
        content = _pixels(self._content.resize((width, height), Image.Resampling.LANCZOS))
        yiq = content @ RGB_TO_YIQ.T
        yiq[..., 0] = luminance(array.astype(np.float64))
        return np.asarray(_to_image(yiq @ YIQ_TO_RGB.T))
