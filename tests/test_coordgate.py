"""coordgate_ext.CoordGate (the paper's module) against an independent transcription of the
first author's class, the "pos" / "map" / "bilinear" encoders, its resolution independence,
load_author_state_dict, error messages, and reference.map_gate / bilinear_coefficients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import coordgate_ext as cg
from coordgate_ext import reference
from tests.support import assert_close

DTYPE = torch.float64
BACKENDS = ["reference", "cpu"]

#: Output channel k of the author's 3x3 coefficients takes ring / centre entry _REORDER[k]; the
#: ring runs clockwise from the top-left corner (0 TL, 1 T, 2 TR, 3 R, 4 BR, 5 B, 6 BL, 7 L),
#: entry 8 is the centre.
_REORDER = [0, 1, 2, 7, 8, 3, 6, 5, 4]
#: (x >= 0?, y >= 0?) -> primary ring direction.
_QUADRANTS = {(True, True): 0, (False, True): 2, (False, False): 4, (True, False): 6}
#: Quadrants whose secondary and tertiary weights are exchanged.
_SWAPPERS = (0, 4)


def _author_bilinear_coefficients(x_disp: torch.Tensor, y_disp: torch.Tensor) -> torch.Tensor:
    """The author's per-pixel construction, quadrant by quadrant: x_disp, y_disp (N, 1, H, W)
    -> (N, 9, H, W). Deliberately not the separable form of reference.bilinear_coefficients."""
    x, y = x_disp[:, 0], y_disp[:, 0]
    ax, ay = x.abs(), y.abs()
    ring = x.new_zeros(x.shape[0], 9, *x.shape[1:])
    for (x_nonneg, y_nonneg), primary in _QUADRANTS.items():
        mask = ((x >= 0) == x_nonneg) & ((y >= 0) == y_nonneg)
        secondary, tertiary = (primary + 1) % 8, (primary - 1) % 8
        n, i, j = mask.nonzero(as_tuple=True)
        a, b = ax[n, i, j], ay[n, i, j]
        ring[n, primary, i, j] = a * b
        if primary in _SWAPPERS:
            ring[n, secondary, i, j] = (1 - a) * b
            ring[n, tertiary, i, j] = a * (1 - b)
        else:
            ring[n, secondary, i, j] = a * (1 - b)
            ring[n, tertiary, i, j] = (1 - a) * b
        ring[n, 8, i, j] = (1 - a) * (1 - b)
    return ring[:, _REORDER]


class _AuthorCoordGate(nn.Module):
    """Our transcription of the first author's CoordGate (out = conv1x1(x * gate)). ``dtype``
    is ours: the author's grid is float32, and a float32 linspace cast to float64 is not the
    float64 linspace."""

    def __init__(self, enc_channels, out_channels, size=(16, 16), enctype="pos", encoding_layers=2,
                 initialiser=None, downsample=(1, 1), dtype=None):
        super().__init__()
        self.enctype = enctype
        self.enc_channels = enc_channels
        self.size = tuple(size)
        self.downsample = tuple(downsample)
        if enctype == "pos":
            rows = torch.linspace(-1, 1, size[0], dtype=dtype)
            cols = torch.linspace(-1, 1, size[1], dtype=dtype)
            self.register_buffer("pos", torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).view(-1, 2))
            self.encoder = nn.Sequential()
            for i in range(encoding_layers):
                self.encoder.add_module(f"linear{i}", nn.Linear(2 if i == 0 else enc_channels, enc_channels))
        elif enctype in ("map", "bilinear"):
            self.map = nn.Parameter(initialiser)
        else:
            raise ValueError(enctype)
        self.conv = nn.Conv2d(enc_channels, out_channels, 1)

    def _upsample(self, gate):
        sh, sw = self.downsample
        return gate.repeat_interleave(sh, dim=2).repeat_interleave(sw, dim=3)

    def forward(self, x):
        if self.enctype == "pos":
            h, w = self.size
            gate = torch.relu(self.encoder(self.pos)).view(1, h, w, self.enc_channels).permute(0, 3, 1, 2)
        elif self.enctype == "map":
            gate = self._upsample(torch.relu(self.map))
        else:
            coeffs = _author_bilinear_coefficients(self.map[:, 0:1], self.map[:, 1:2])
            gate = self._upsample(torch.relu(coeffs))
        return self.conv(x * gate)


def _randomise(module: nn.Module, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)


def _author_pos(channels, out_channels, size, layers, device):
    author = _AuthorCoordGate(channels, out_channels, size=list(size), enctype="pos",
                              encoding_layers=layers, dtype=DTYPE).to(device, DTYPE)
    _randomise(author)
    return author


def _ours(channels, out_channels, encoder, backend, device, **options):
    return cg.CoordGate(channels, out_channels, encoder, backend=backend, device=device, dtype=DTYPE,
                        **options)


def _check_twins(ours, author, x, ours_params, author_params):
    """Same output, and same gradients w.r.t. the input and the paired parameters (the author's
    maps carry a leading batch dimension of 1 that ours do not)."""
    x_ours = x.detach().clone().requires_grad_(True)
    x_author = x.detach().clone().requires_grad_(True)
    out, expected = ours(x_ours), author(x_author)
    assert out.shape == expected.shape
    assert_close(out, expected)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, [x_ours, *ours_params], grad)
    want = torch.autograd.grad(expected, [x_author, *author_params], grad)
    for g, w in zip(got, want):
        assert_close(g, w.reshape(g.shape))


def _skip_cpu_backend_on_gpu(backend, device):
    if backend == "cpu" and device != "cpu":
        pytest.skip("the 'cpu' backend runs CPU tensors only")


# ---------------------------------------------------------------------------------------------
# "pos" (our "mlp")

# (encoding_layers, enc_channels, (H, W), encoder name)
POS_CASES = [
    (layers, channels, size, name)
    for layers in (1, 2, 3)
    for channels in (4, 7)
    for size in ((8, 8), (9, 13))
    for name in ("mlp", "pos")
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", POS_CASES, ids=lambda c: f"L{c[0]}-C{c[1]}-{c[2][0]}x{c[2][1]}-{c[3]}")
def test_pos_matches_author(case, backend, device):
    _skip_cpu_backend_on_gpu(backend, device)
    layers, channels, size, name = case
    author = _author_pos(channels, 5, size, layers, device)
    gate = torch.relu(author.encoder(author.pos))
    # The comparison must see the ReLU both clip and pass.
    assert (gate == 0).any() and (gate > 0).any()

    ours = _ours(channels, 5, name, backend, device, encoder_layers=layers)
    assert ours.encoder_kind == "mlp"
    ours.load_author_state_dict(author.state_dict())
    x = torch.randn(2, channels, *size, dtype=DTYPE, device=device)
    ours_params = [p for layer in ours.encoder.layers for p in (layer.weight, layer.bias)]
    ours_params += [ours.conv.weight, ours.conv.bias]
    author_params = [p for layer in author.encoder for p in (layer.weight, layer.bias)]
    author_params += [author.conv.weight, author.conv.bias]
    _check_twins(ours, author, x, ours_params, author_params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pos_is_resolution_independent(backend, device):
    """One module on two grids equals the author's module built for each grid."""
    _skip_cpu_backend_on_gpu(backend, device)
    channels, layers = 6, 2
    author_16 = _author_pos(channels, 5, (16, 16), layers, device)
    weights = {k: v for k, v in author_16.state_dict().items() if k != "pos"}
    author_10x12 = _AuthorCoordGate(channels, 5, size=[10, 12], enctype="pos",
                                    encoding_layers=layers, dtype=DTYPE).to(device, DTYPE)
    missing, unexpected = author_10x12.load_state_dict(weights, strict=False)
    assert missing == ["pos"] and not unexpected

    ours = _ours(channels, 5, "mlp", backend, device, encoder_layers=layers)
    ours.load_author_state_dict(author_16.state_dict())
    for author, size in ((author_16, (16, 16)), (author_10x12, (10, 12))):
        x = torch.randn(2, channels, *size, dtype=DTYPE, device=device)
        assert_close(ours(x), author(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_author_state_dict_refreshes_cached_gate(backend, device):
    """In eval mode under no_grad the gate is cached; loading new weights must invalidate it."""
    _skip_cpu_backend_on_gpu(backend, device)
    first = _author_pos(4, 3, (9, 13), 2, device)
    second = _author_pos(4, 3, (9, 13), 2, device)
    ours = _ours(4, 3, "pos", backend, device, encoder_layers=2).eval()
    x = torch.randn(2, 4, 9, 13, dtype=DTYPE, device=device)
    with torch.no_grad():
        ours.load_author_state_dict(first.state_dict())
        assert_close(ours(x), first(x))
        ours.load_author_state_dict(second.state_dict())
        assert_close(ours(x), second(x))


# ---------------------------------------------------------------------------------------------
# "map" and "bilinear"

# (enctype, map (Hm, Wm), downsample (sh, sw))
MAP_CASES = [
    ("map", (4, 4), (2, 3)),
    ("map", (3, 5), (1, 1)),
    ("map", (2, 3), (4, 2)),
    ("bilinear", (4, 4), (2, 3)),
    ("bilinear", (3, 5), (1, 1)),
    ("bilinear", (5, 3), (3, 2)),
]


def _random_displacement(shape, device) -> torch.Tensor:
    """(..., 2, Hm, Wm) displacements (dx, dy) in [-1.5, 1.5] (Hm, Wm >= 3): random, plus
    exact zeros on both axes (both 0 at the top-left pixel, a -0.0 at the bottom-right) and
    one pixel in each quadrant with a component beyond 1."""
    d = (torch.rand(*shape, dtype=DTYPE, device=device) * 3 - 1.5)
    d[..., 0, 0, :] = 0.0
    d[..., 1, :, 0] = 0.0
    d[..., 1, -1, -1] = -0.0
    for (i, j), (dx, dy) in {(1, 1): (1.3, 1.2), (1, 2): (-1.4, 0.7), (2, 1): (0.6, -1.1),
                             (2, 2): (-0.5, -1.5)}.items():
        d[..., 0, i, j], d[..., 1, i, j] = dx, dy
    return d


def _assert_all_quadrants(dx: torch.Tensor, dy: torch.Tensor) -> None:
    for x_nonneg in (True, False):
        for y_nonneg in (True, False):
            quadrant = ((dx >= 0) == x_nonneg) & ((dy >= 0) == y_nonneg)
            assert quadrant.any()
            assert (quadrant & ((dx.abs() > 1) | (dy.abs() > 1))).any()
    assert ((dx == 0) & (dy == 0)).any() and ((dx == 0) & (dy != 0)).any() and ((dy == 0) & (dx != 0)).any()


@pytest.mark.parametrize("case", MAP_CASES, ids=lambda c: f"{c[0]}-{c[1][0]}x{c[1][1]}-ds{c[2][0]}x{c[2][1]}")
def test_map_and_bilinear_match_author(case, device):
    enctype, (hm, wm), (sh, sw) = case
    channels = 9 if enctype == "bilinear" else 6
    if enctype == "map":
        initialiser = torch.randn(1, channels, hm, wm, dtype=DTYPE, device=device)
    else:
        initialiser = _random_displacement((1, 2, hm, wm), device)
        _assert_all_quadrants(initialiser[0, 0], initialiser[0, 1])
    author = _AuthorCoordGate(channels, 5, size=[hm * sh, wm * sw], enctype=enctype,
                              initialiser=initialiser, downsample=[sh, sw]).to(device, DTYPE)
    with torch.no_grad():
        author.conv.weight.normal_()
        author.conv.bias.normal_()

    ours = _ours(channels, 5, enctype, "auto", device, map_size=(hm, wm))
    ours.load_author_state_dict(author.state_dict())
    x = torch.randn(2, channels, hm * sh, wm * sw, dtype=DTYPE, device=device)
    ours_map = ours.encoder.map if enctype == "map" else ours.encoder.displacement
    _check_twins(ours, author, x, [ours_map, ours.conv.weight, ours.conv.bias],
                 [author.map, author.conv.weight, author.conv.bias])


def test_bilinear_coefficients_match_author(device):
    displacement = _random_displacement((2, 11, 13), device)
    _assert_all_quadrants(displacement[0], displacement[1])
    ours = reference.bilinear_coefficients(displacement)
    theirs = _author_bilinear_coefficients(displacement[None, 0:1], displacement[None, 1:2])[0]
    assert ours.shape == (9, 11, 13)
    assert_close(ours, theirs)
    # Inside the unit square the weights are a partition of unity.
    inside = (displacement.abs() <= 1).all(dim=0)
    assert_close(ours.sum(dim=0)[inside], torch.ones_like(ours[0][inside]))


def test_bilinear_zero_displacement_is_identity(device):
    coeffs = reference.bilinear_coefficients(torch.zeros(2, 3, 4, dtype=DTYPE, device=device))
    expected = torch.zeros(9, 3, 4, dtype=DTYPE, device=device)
    expected[4] = 1
    assert torch.equal(coeffs, expected)


# ---------------------------------------------------------------------------------------------
# reference.map_gate


def _bilinear_resample(g: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, Hm, Wm) -> (C, height, width), half-pixel centres, edges clamped, written out."""

    def taps(n_in: int, n_out: int):
        src = ((torch.arange(n_out, dtype=DTYPE) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, src - lo

    r0, r1, lr = (t.to(g.device) for t in taps(g.shape[1], height))
    c0, c1, lc = (t.to(g.device) for t in taps(g.shape[2], width))
    top = g[:, r0][:, :, c0] * (1 - lc) + g[:, r0][:, :, c1] * lc
    bottom = g[:, r1][:, :, c0] * (1 - lc) + g[:, r1][:, :, c1] * lc
    return top * (1 - lr[:, None]) + bottom * lr[:, None]


# (map (Hm, Wm), grid (H, W), gate activation)
MAP_GATE_CASES = [
    ((4, 4), (8, 12), "relu"),
    ((3, 5), (3, 5), "relu"),
    ((2, 3), (6, 3), "sigmoid"),
    ((4, 4), (8, 10), "relu"),
    ((4, 4), (10, 8), "relu"),
    ((3, 5), (7, 11), "sigmoid"),
    ((4, 6), (3, 2), "relu"),
]


@pytest.mark.parametrize("case", MAP_GATE_CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-to-{c[1][0]}x{c[1][1]}-{c[2]}")
def test_map_gate(case, device):
    (hm, wm), (h, w), act = case
    gate_map = torch.randn(3, hm, wm, dtype=DTYPE, device=device)
    psi = reference.activation(act, gate_map)
    out = reference.map_gate(gate_map, h, w, act)
    assert out.shape == (3, h, w)
    if h % hm == 0 and w % wm == 0:
        expected = psi.repeat_interleave(h // hm, dim=1).repeat_interleave(w // wm, dim=2)
        assert torch.equal(out, expected)
    else:
        expected = F.interpolate(psi[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        assert_close(out, expected)
        assert_close(out, _bilinear_resample(psi, h, w))


# ---------------------------------------------------------------------------------------------
# errors


def test_load_author_state_dict_rejects_extra_encoder_layers():
    author = _author_pos(4, 3, (8, 8), 3, "cpu")
    ours = _ours(4, 3, "mlp", "reference", "cpu", encoder_layers=2)
    with pytest.raises(ValueError, match=r"encoder entries this module lacks.*encoder\.linear2\.weight"
                       r".*matching encoder_layers"):
        ours.load_author_state_dict(author.state_dict())


def test_load_author_state_dict_rejects_missing_encoder_layers():
    author = _author_pos(4, 3, (8, 8), 1, "cpu")
    ours = _ours(4, 3, "mlp", "reference", "cpu", encoder_layers=2)
    with pytest.raises(ValueError, match=r"has no 'encoder\.linear1\.weight'.*encoder_layers"):
        ours.load_author_state_dict(author.state_dict())


def test_load_author_state_dict_rejects_wrong_encoder_and_batched_map():
    ours = _ours(4, 3, "map", "reference", "cpu", map_size=(2, 2))
    with pytest.raises(ValueError, match=r"has no 'map'"):
        ours.load_author_state_dict(_author_pos(4, 3, (8, 8), 2, "cpu").state_dict())
    bad = {"map": torch.randn(2, 4, 2, 2), "conv.weight": torch.randn(3, 4, 1, 1), "conv.bias": torch.randn(3)}
    with pytest.raises(ValueError, match=r"the author's 'map' must have shape \(1, C, Hm, Wm\), got \(2, 4, 2, 2\)"):
        ours.load_author_state_dict(bad)


def test_forward_rejects_wrong_channel_count():
    ours = _ours(4, 3, "mlp", "reference", "cpu")
    with pytest.raises(ValueError, match=r"CoordGate: expected 4 input channels, got 3"):
        ours(torch.randn(2, 3, 8, 8, dtype=DTYPE))


def test_forward_rejects_2d_and_5d_input():
    ours = _ours(4, 3, "mlp", "reference", "cpu")
    for shape in ((4, 8), (1, 1, 4, 8, 8)):
        with pytest.raises(ValueError, match=rf"CoordGate: expected a 3-D \(C, H, W\) or 4-D \(N, C, H, W\) "
                                             rf"input, got {len(shape)}-D"):
            ours(torch.randn(*shape, dtype=DTYPE))
