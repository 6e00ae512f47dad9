"""The experiments' networks: U-Nets (plain, CoordConv, CoordGate), a MultiWienerNet-style
model for 2-D restoration, and small 1-D networks for the signal task.

U-Net layout (``levels`` L, widths w_l = width * 2^l):

    encoder   block_0(in -> w_0) -> pool -> block_1(w_0 -> w_1) -> pool -> ... -> block_{L-1}
    decoder   for l = L-2 .. 0: up(w_{l+1} -> w_l) (2x2 transposed conv), concat the skip of
              level l, block(2 w_l -> w_l)
    head      1x1 conv (w_0 -> out); with ``residual`` the input is added (out = x + head),
              so the network learns the correction, which trains much faster on restoration.

A block is conv3x3 -> ReLU -> conv3x3 -> ReLU. The kinds differ only in the blocks:
- "plain": as above;
- "coordconv" (Liu et al. 2018): two coordinate channels (r, q) = linspace(-1, 1) along rows
  and columns are concatenated to the input of every block (its first conv gets 2 more inputs);
- "coordgate": the second conv of every block is a FusedCoordGateBlock2d (conv3x3 -> coordinate
  gate -> 1x1 mix, the first author's CG_convolution_layer). Every block's output feeds a pool,
  a transposed conv or the head, so this puts a CoordGate before every downsample, before every
  upsample and before the output conv, as in the first author's network. Its gates start
  near one (init_gate_near_one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .conv import FusedCoordGateBlock2d
from .conv1d import FusedCoordGateConv1d

__all__ = [
    "UNET_KINDS",
    "SIGNAL_KINDS",
    "count_parameters",
    "add_coords",
    "init_gate_near_one",
    "UNet",
    "MultiWienerNet",
    "SignalNet",
]

UNET_KINDS = ("plain", "coordconv", "coordgate")
SIGNAL_KINDS = ("plain", "coordconv", "coordgate")

#: The gate of the CoordGate models: the package's MLP encoder, two layers of 32 with a ReLU
#: between them, and no final activation: a ReLU gate that starts negative over the whole field
#: passes no gradient and the channel stays dead (see demo.py); the 1x1 mix absorbs the sign.
#: nn.Linear's initialisation (gate_init="default"), which the U-Net shifts by one
#: (init_gate_near_one): the start that the experiments' recorded results were trained from.
DEFAULT_GATE = dict(encoder="mlp", encoder_layers=2, encoder_hidden=32, hidden_activation="relu",
                    gate_activation="none", gate_init="default")


def init_gate_near_one(layer: nn.Module) -> None:
    """Shifts an MLP-gated layer's gate by +1 (the last encoder layer's bias), so that it starts
    as g = 1 + a small random field: the network starts close to its plain twin and learns the
    spatial variation from there. With nn.Linear's initialisation alone the gate starts as
    small values of random sign, which scale every gated feature down and slowed training
    markedly in our 2-D runs (29.1 against 31.0 dB on the demo at 400 steps). SignalNet does not
    use it: on the 1-D demo at 400 steps it measured worse (27.0 against 31.8 dB, one seed each)."""
    with torch.no_grad():
        layer.encoder.layers[-1].bias.add_(1.0)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_coords(x: torch.Tensor) -> torch.Tensor:
    """CoordConv's input: x (N, C, H, W) -> (N, C + 2, H, W) with the row coordinate
    linspace(-1, 1, H) and the column coordinate linspace(-1, 1, W) appended; for a signal
    (N, C, L) -> (N, C + 1, L) with linspace(-1, 1, L)."""
    n = x.shape[0]
    if x.dim() == 3:
        t = torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype, device=x.device)
        return torch.cat([x, t.expand(n, 1, -1)], dim=1)
    h, w = x.shape[-2:]
    r = torch.linspace(-1, 1, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
    q = torch.linspace(-1, 1, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
    return torch.cat([x, r, q], dim=1)


class _Block(nn.Module):
    """conv3x3 -> ReLU -> conv3x3 -> ReLU of the given U-Net kind."""

    def __init__(self, in_channels: int, out_channels: int, kind: str, gate_options: dict):
        super().__init__()
        self.coords = kind == "coordconv"
        self.conv1 = nn.Conv2d(in_channels + 2 * self.coords, out_channels, 3, padding=1)
        if kind == "coordgate":
            self.conv2 = FusedCoordGateBlock2d(out_channels, out_channels, out_channels, 3, padding=1,
                                               **gate_options)
            if gate_options.get("encoder", "mlp") == "mlp":
                init_gate_near_one(self.conv2)
        else:
            self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.coords:
            x = add_coords(x)
        return F.relu(self.conv2(F.relu(self.conv1(x))))


class UNet(nn.Module):
    """U-Net of ``kind`` "plain", "coordconv" or "coordgate" (see the module docstring).

    x (N, in_channels, H, W) -> (N, out_channels, H, W); H and W must be multiples of
    2^(levels - 1). ``gate_options`` (coordgate only) are FusedCoordGateBlock2d's encoder
    options, default DEFAULT_GATE. ``residual`` needs in_channels == out_channels.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        width: int = 16,
        levels: int = 3,
        kind: str = "plain",
        *,
        residual: bool = True,
        gate_options: dict | None = None,
    ):
        super().__init__()
        if kind not in UNET_KINDS:
            raise ValueError(f"kind must be one of {', '.join(UNET_KINDS)}; got {kind!r}")
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        if residual and in_channels != out_channels:
            raise ValueError(f"residual needs in_channels == out_channels, got {in_channels} and {out_channels}")
        gate = dict(DEFAULT_GATE if gate_options is None else gate_options)
        widths = [width * 2**level for level in range(levels)]
        self.kind, self.levels, self.residual = kind, levels, residual
        self.down = nn.ModuleList(
            _Block(a, b, kind, gate) for a, b in zip([in_channels] + widths[:-1], widths)
        )
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[l + 1], widths[l], 2, stride=2)
                                for l in reversed(range(levels - 1)))
        self.merge = nn.ModuleList(_Block(2 * widths[l], widths[l], kind, gate)
                                   for l in reversed(range(levels - 1)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (self.levels - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"UNet with {self.levels} levels: H and W must be multiples of {factor}, got {tuple(x.shape[-2:])}"
            )
        skips = []
        z = x
        for level, block in enumerate(self.down):
            z = block(z)
            if level < self.levels - 1:
                skips.append(z)
                z = F.max_pool2d(z, 2)
        for up, merge in zip(self.up, self.merge):
            z = merge(torch.cat([up(z), skips.pop()], dim=1))
        out = self.head(z)
        return x + out if self.residual else out

    def gate_layers(self) -> list[FusedCoordGateBlock2d]:
        """The gated layers, encoder first (empty unless kind is "coordgate")."""
        return [m for m in self.modules() if isinstance(m, FusedCoordGateBlock2d)]


class MultiWienerNet(nn.Module):
    """MultiWienerNet-style restoration (Yanny et al. 2022): K learnable PSFs, one Fourier
    Wiener deconvolution per PSF, then a U-Net that merges the K estimates.

        Y = FFT(pad(y)),  X_k = conj(H_k) Y / (|H_k|^2 + lambda_k),  x_k = crop(IFFT(X_k)),
        out = mean_k x_k + UNet([x_1 .. x_K])     (the U-Net learns the correction)

    y (N, 1, H, W); psfs (K, kh, kw) odd sizes, the initial PSFs (e.g. measured at K field
    positions; they are trained); lambda_k = exp(log_lambda_k) > 0, initialised to
    ``regularisation``. The image is reflect-padded by the PSF's half-size on each side so that
    the FFT's circular wrap-around falls on the padding. The U-Net is a plain one.
    """

    def __init__(self, psfs: torch.Tensor, width: int = 16, levels: int = 3, regularisation: float = 1e-2):
        super().__init__()
        if psfs.dim() != 3 or psfs.shape[-1] % 2 == 0 or psfs.shape[-2] % 2 == 0:
            raise ValueError(f"psfs must be (K, kh, kw) with odd kh, kw; got {tuple(psfs.shape)}")
        self.psfs = nn.Parameter(psfs.detach().clone().float())
        self.log_lambda = nn.Parameter(torch.full((psfs.shape[0],), math.log(regularisation)))
        self.unet = UNet(psfs.shape[0], 1, width, levels, "plain", residual=False)

    def wiener(self, y: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> (N, K, H, W): the K Wiener estimates."""
        kh, kw = self.psfs.shape[-2:]
        ph, pw = kh // 2, kw // 2
        padded = F.pad(y, (pw, pw, ph, ph), mode="reflect")
        size = padded.shape[-2:]
        # The PSF's centre goes to index (0, 0): then the FFT product is a centred convolution.
        kernel = F.pad(self.psfs, (0, size[1] - kw, 0, size[0] - kh)).roll((-ph, -pw), dims=(-2, -1))
        h = torch.fft.rfft2(kernel)
        yf = torch.fft.rfft2(padded)
        lam = self.log_lambda.exp()[:, None, None]
        x = torch.fft.irfft2(h.conj() * yf / (h.abs() ** 2 + lam), s=size)
        return x[..., ph:ph + y.shape[-2], pw:pw + y.shape[-1]]

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        estimates = self.wiener(y)
        return estimates.mean(1, keepdim=True) + self.unet(estimates)


class SignalNet(nn.Module):
    """A small 1-D network for the signal task: ``depth`` convolutions of ``kernel_size``
    (1 -> width -> ... -> width), a ReLU after each, then a 1x1 conv to one channel.

    "plain": nn.Conv1d; "coordconv": the position t = linspace(-1, 1, L) concatenated to every
    conv's input; "coordgate": every conv is a FusedCoordGateConv1d with the given
    ``gate_options`` (default DEFAULT_GATE), its gate initialised as nn.Linear does (see
    init_gate_near_one for why not near one). x (N, 1, L) -> (N, 1, L) ('same' padding).
    """

    def __init__(self, kind: str = "plain", width: int = 8, depth: int = 2, kernel_size: int = 15,
                 *, gate_options: dict | None = None):
        super().__init__()
        if kind not in SIGNAL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(SIGNAL_KINDS)}; got {kind!r}")
        gate = dict(DEFAULT_GATE if gate_options is None else gate_options)
        self.kind = kind
        widths = [1] + [width] * depth
        extra = 1 if kind == "coordconv" else 0
        if kind == "coordgate":
            self.convs = nn.ModuleList(FusedCoordGateConv1d(a, b, kernel_size, padding="same", **gate)
                                       for a, b in zip(widths[:-1], widths[1:]))
        else:
            self.convs = nn.ModuleList(nn.Conv1d(a + extra, b, kernel_size, padding="same")
                                       for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Conv1d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.relu(conv(add_coords(x) if self.kind == "coordconv" else x))
        return self.head(x)
