"""How the input of activation maximization is drawn and parametrized: the random affine
transform applied at each step, and the pixel, Fourier and generator-code parametrizations."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

# --- robustness transforms -------------------------------------------------------------

class RandomAffine:
    """A random shift (up to ``jitter`` pixels), rotation (up to ``rotate`` degrees) and scaling
    (factor in ``scale``) per sample and step. A prototype must then excite the model wherever and
    however it is drawn, which suppresses high-frequency adversarial patterns (Olah et al. 2017)."""

    def __init__(self, jitter: float = 2.0, rotate: float = 0.0, scale: tuple = (1.0, 1.0)):
        if jitter < 0 or rotate < 0:
            raise ValueError(f"jitter and rotate must be >= 0, got jitter={jitter}, rotate={rotate}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        self.jitter, self.rotate, self.scale = float(jitter), float(rotate), (float(scale[0]), float(scale[1]))

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"RandomAffine works on images [N, C, H, W], got shape {tuple(x.shape)}")
        n, _, h, w = x.shape

        def uniform(low, high):
            return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

        angle = uniform(-self.rotate, self.rotate) * math.pi / 180
        factor = uniform(*self.scale)
        # affine_grid works in [-1, 1] coordinates: a shift of s pixels is 2 s / size.
        shift_x = uniform(-self.jitter, self.jitter) * 2 / w
        shift_y = uniform(-self.jitter, self.jitter) * 2 / h
        cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
        theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        # Reflection keeps the border statistics of the image instead of inventing black frames.
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def __repr__(self):
        return f"RandomAffine(jitter={self.jitter:g}, rotate={self.rotate:g}, scale={self.scale})"


# --- parametrizations ------------------------------------------------------------------

def _fourier_scale(h: int, w: int, decay: float, device, dtype) -> torch.Tensor:
    """1 / |f|^decay per rfft2 coefficient, normalised to unit root-mean-square."""
    fy = torch.fft.fftfreq(h, device=device, dtype=dtype)[:, None]
    fx = torch.fft.rfftfreq(w, device=device, dtype=dtype)[None, :]
    freq = torch.sqrt(fy**2 + fx**2).clamp(min=1.0 / max(h, w))  # the DC term gets the lowest frequency's weight
    scale = freq.pow(-decay)
    # Unit RMS: white noise in the parameters then gives pixels of about the same spread as the pixel
    # parametrization, so the learning rate means the same thing in both.
    return scale / scale.pow(2).mean().sqrt()


class _Pixels:
    """The image's (pre-squashing) values are the parameters."""

    def __init__(self, raw: torch.Tensor):
        self.raw = raw.detach().clone().requires_grad_(True)
        self.parameters = [self.raw]

    def __call__(self) -> torch.Tensor:
        return self.raw


class _Fourier:
    """The parameters are the image's 2-D real FFT, each frequency scaled by 1 / |f|: gradient steps
    of equal size in every coefficient then change low frequencies most, as natural images do
    (Olah et al. 2017). It preconditions the ascent; the set of reachable images is the same."""

    def __init__(self, raw: torch.Tensor, decay: float):
        h, w = raw.shape[-2:]
        self.size = (h, w)
        self.scale = _fourier_scale(h, w, decay, raw.device, raw.dtype)
        spectrum = torch.fft.rfft2(raw.detach(), norm="ortho") / self.scale
        self.spectrum = torch.view_as_real(spectrum).clone().requires_grad_(True)
        self.parameters = [self.spectrum]

    def __call__(self) -> torch.Tensor:
        return torch.fft.irfft2(torch.view_as_complex(self.spectrum) * self.scale, s=self.size, norm="ortho")


class _Code:
    """The parameters are a generator's code z; the image is generator(z) (Nguyen et al. 2016)."""

    def __init__(self, code: torch.Tensor, generator: Callable):
        self.code = code.detach().clone().requires_grad_(True)
        self.generator = generator
        self.parameters = [self.code]

    def __call__(self) -> torch.Tensor:
        return self.generator(self.code)
