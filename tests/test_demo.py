"""The demo (coordgate_ext/demo.py): its ground-truth operator, and a quick run of its training."""

from __future__ import annotations

import pytest
import torch

from coordgate_ext import demo


def _impulse_response(size: int, row: int, col: int) -> torch.Tensor:
    """The ground truth's response to a unit point source at (row, col): the 7x7 patch around it."""
    image = torch.zeros(1, 1, size, size)
    image[0, 0, row, col] = 1
    half = demo.KERNEL_SIZE // 2
    response = demo.spatially_varying_blur(image)[0, 0]
    return response[row - half : row + half + 1, col - half : col + half + 1]


def _variances(patch: torch.Tensor) -> tuple[float, float]:
    """Second moments of a centred patch along H and along W, in pixels squared."""
    offsets = torch.arange(patch.shape[0], dtype=patch.dtype) - patch.shape[0] // 2
    weights = patch / patch.sum()
    return (weights.sum(1) @ offsets**2).item(), (weights.sum(0) @ offsets**2).item()


def test_weight_maps_and_psfs_are_normalised():
    masks = demo.radial_masks(40, 56)
    assert masks.shape == (len(demo.MASK_CENTRES), 40, 56)
    assert (masks >= 0).all()
    torch.testing.assert_close(masks.sum(0), torch.ones(40, 56))
    psfs = demo.gaussian_psfs()
    torch.testing.assert_close(psfs.sum(dim=(1, 2)), torch.ones(len(demo.PSF_SIGMAS)))
    # Symmetric in u and in v, which makes F.conv2d's correlation a convolution.
    torch.testing.assert_close(psfs, psfs.flip(1).flip(2))


def test_ground_truth_varies_in_space():
    """A point source is blurred little at the centre of the field, much and anisotropically
    (wider along W) near a corner."""
    size = 64
    half = demo.KERNEL_SIZE // 2
    centre = _impulse_response(size, size // 2, size // 2)
    corner = _impulse_response(size, half, half)
    # Away from the border the whole PSF fits in the image: the blur keeps the flux.
    for patch in (centre, corner):
        assert patch.sum().item() == pytest.approx(1, abs=0.02)
    assert centre.max() > 5 * corner.max()
    centre_h, centre_w = _variances(centre)
    corner_h, corner_w = _variances(corner)
    assert corner_h > 2 * centre_h and corner_w > 2 * centre_w
    assert corner_w > 1.2 * corner_h
    # The operator is linear: the response to two sources is the sum of the responses.
    pair = torch.zeros(1, 1, size, size)
    pair[0, 0, size // 2, size // 2] = pair[0, 0, half, half] = 1
    both = demo.spatially_varying_blur(pair)[0, 0]
    torch.testing.assert_close(both[: 2 * half + 1, : 2 * half + 1], corner)


def test_quick_run_fits_and_backends_agree(capsys):
    rng_before, threads_before = torch.get_rng_state(), torch.get_num_threads()
    result = demo.main(["--quick"])
    out = capsys.readouterr().out
    assert "fused and reference agree" in out
    # The demo seeds its models and sets its thread count without changing the caller's.
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads_before

    steps, coordgate_loss, conv_loss = zip(*result.history)
    assert steps[-1] == demo.QUICK["steps"]
    assert coordgate_loss[-1] < 0.3 * coordgate_loss[0]
    assert coordgate_loss[-1] < 0.5 * conv_loss[-1]
    ev = result.evaluation
    assert ev.coordgate_noise_mse < 0.5 * ev.conv_noise_mse
    assert ev.backend_max_diff < demo.BACKEND_TOLERANCE


def test_backend_disagreement_fails_the_run(monkeypatch):
    monkeypatch.setattr(demo, "BACKEND_TOLERANCE", 0.0)
    with pytest.raises(SystemExit, match="fused and reference DISAGREE"):
        demo.main(["--quick", "--steps", "2", "--size", "16"])
