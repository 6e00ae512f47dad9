"""The metrics (PSNR, SSIM, MSE), the training loop (the loss falls; checkpoints resume
exactly) and the command line on the "quick" preset, with and without matplotlib."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest
import torch

from coordgate_ext import data, metrics
from coordgate_ext.experiments import PRESETS, TaskSettings, core, main, report, run, train
from coordgate_ext.experiments.core import build_1d, build_2d, predict


# ----------------------------------------------------------------------------- metrics


def test_identical_inputs():
    x = torch.rand(3, 2, 16, 20)
    assert torch.all(torch.isinf(metrics.psnr(x, x)))
    torch.testing.assert_close(metrics.ssim(x, x), torch.ones(3, dtype=torch.float64))
    assert torch.equal(metrics.mse(x, x), torch.zeros(3))


def test_psnr_known_values():
    x = torch.zeros(2, 1, 8, 8)
    y = x + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)
    torch.testing.assert_close(metrics.psnr(x, y), torch.tensor([20.0, 40.0]))
    torch.testing.assert_close(metrics.psnr(x, 2 * y, data_range=2.0), torch.tensor([20.0, 40.0]))
    # Gaussian noise of sigma gives 20 log10(1 / sigma) up to the sampling error of the MSE.
    g = torch.Generator().manual_seed(0)
    clean = torch.zeros(1, 1, 256, 256)
    noisy = clean + 0.05 * torch.randn(clean.shape, generator=g)
    assert abs(metrics.psnr(clean, noisy).item() - 20 * math.log10(1 / 0.05)) < 0.05


def test_ssim_of_constant_images():
    """For flat images the contrast-structure term is C2 / C2 = 1 and SSIM is the luminance
    term (2 a b + C1) / (a^2 + b^2 + C1) exactly."""
    a, b = 0.3, 0.6
    x = torch.full((1, 1, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 1, 16, 16), b, dtype=torch.float64)
    c1 = (0.01) ** 2
    expected = (2 * a * b + c1) / (a**2 + b**2 + c1)
    assert abs(metrics.ssim(x, y).item() - expected) < 1e-12


def test_ssim_of_noise_on_a_flat_image():
    """x flat, y = x + N(0, s^2): mu_x ~ mu_y, s_x = 0, so SSIM ~ C2 / (E_w[s_y^2] + C2) with
    the window-weighted variance E_w[s_y^2] = s^2 (1 - sum w^2). The mean over windows of
    C2 / (V + C2) exceeds C2 / (E[V] + C2) (Jensen; about 4% here), hence the tolerance; a wrong
    constant (K2 = 0.01 gives 0.04) or a wrong window is far outside it."""
    s = 0.05
    g = torch.Generator().manual_seed(1)
    x = torch.full((1, 1, 128, 128), 0.5, dtype=torch.float64)
    y = x + s * torch.randn(x.shape, generator=g, dtype=torch.float64)
    w = metrics.gaussian_window()
    weighted_var = s**2 * (1 - (w[:, None] * w[None, :]).square().sum().item())
    expected = 0.03**2 / (weighted_var + 0.03**2)
    assert abs(metrics.ssim(x, y).item() / expected - 1) < 0.06


def test_ssim_properties_and_1d():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 32, 32, generator=g)
    y = x + 0.1 * torch.randn(x.shape, generator=g)
    z = x + 0.3 * torch.randn(x.shape, generator=g)
    torch.testing.assert_close(metrics.ssim(x, y), metrics.ssim(y, x))
    assert torch.all(metrics.ssim(x, z) < metrics.ssim(x, y))
    assert torch.all(metrics.ssim(x, y) < 1)
    # Signals use the 1-D window; a 1 x L image is not a signal (the window does not fit).
    s = torch.rand(4, 1, 64, generator=g)
    torch.testing.assert_close(metrics.ssim(s, s), torch.ones(4, dtype=torch.float64))
    assert torch.all(metrics.ssim(s, s + 0.2) < 1)
    with pytest.raises(ValueError, match="window"):
        metrics.ssim(s[:, :, None], s[:, :, None])


def test_metric_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.mse(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match=r"\(N, C, L\)"):
        metrics.psnr(torch.zeros(4, 4), torch.zeros(4, 4))


# ----------------------------------------------------------------------------- training


def _tiny_2d():
    task = TaskSettings(steps=40, batch=8, lr=3e-3, n_train=32, n_test=8, widths={"coordgate-unet": 4},
                        size=16, levels=2)
    return task, data.make_microscopy_dataset(task.n_train, task.size, seed=0)


def test_training_reduces_the_loss():
    task, train_set = _tiny_2d()
    torch.manual_seed(0)
    model = build_2d("coordgate-unet", 4, task.levels, train_set)

    def loss() -> float:
        return torch.nn.functional.mse_loss(predict(model, train_set.inputs, torch.device("cpu")),
                                            train_set.targets).item()

    before = loss()
    seconds, losses = train(model, train_set, task, seed=0, device=torch.device("cpu"), label="test",
                            progress=False)
    after = loss()
    assert after < 0.7 * before, (before, after)
    assert seconds > 0 and [s for s, _ in losses] == list(range(4, 41, 4))


def test_checkpoint_resume_is_exact(tmp_path, monkeypatch):
    """Training 6 steps straight equals training to a step-3 checkpoint and resuming."""
    task = TaskSettings(steps=6, batch=4, lr=3e-3, n_train=16, n_test=4, widths={"coordgate": 4}, size=32)
    train_set = data.make_signal_dataset(16, seed=0, task=data.SignalTask(length=32))
    device = torch.device("cpu")

    def fresh():
        torch.manual_seed(0)
        return build_1d("coordgate", 4)

    straight = fresh()
    train(straight, train_set, task, seed=0, device=device, label="a", progress=False)

    path = str(tmp_path / "ckpt.pt")
    at_step_3 = str(tmp_path / "step3.pt")
    real_save = torch.save

    def save_and_keep_step_3(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if obj["step"] == 3:
            shutil.copy(f, at_step_3)

    monkeypatch.setattr(torch, "save", save_and_keep_step_3)
    train(fresh(), train_set, task, seed=0, device=device, label="b", checkpoint=path, checkpoint_every=3,
          progress=False)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["step"] == 6
    shutil.copy(at_step_3, path)
    resumed = fresh()
    _, losses = train(resumed, train_set, task, seed=0, device=device, label="c", checkpoint=path,
                      resume=True, progress=False)
    assert [s for s, _ in losses] == [4, 5, 6]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_command_line_quick(tmp_path, capsys):
    outcome = main(["--preset", "quick", "--out", str(tmp_path), "--no-progress", "--width", "coordgate-unet=6"])
    printed = capsys.readouterr().out
    for label in ("U-Net", "CoordConv U-Net", "MultiWienerNet", "CoordGate U-Net", "CNN", "CoordGate CNN",
                  "input (no model)", "PSNR (dB)", "figure:", "total wall time"):
        assert label in printed
    figure = outcome["paths"]["figure"]
    assert os.path.getsize(figure) > 10_000 and open(figure, "rb").read(4) == b"\x89PNG"
    saved = json.load(open(outcome["paths"]["json"]))
    models = [r["model"] for r in saved["tasks"]["2d"]["results"]]
    assert models == list(PRESETS["quick"]().task_2d.widths)
    assert saved["settings"]["task_2d"]["widths"]["coordgate-unet"] == 6
    assert os.path.exists(tmp_path / "checkpoints" / "2d-coordgate-unet.pt")
    assert all(math.isfinite(r["psnr"]) for r in saved["tasks"]["1d"]["results"])


def test_command_line_model_selection_and_errors(tmp_path, capsys):
    main(["--preset", "quick", "--out", str(tmp_path), "--no-progress", "--models", "coordgate", "--steps", "2"])
    printed = capsys.readouterr().out
    assert "CoordGate CNN" in printed and "U-Net" not in printed
    for argv, message in ((["--models", "resnet"], "unknown model"), (["--tasks", "3d"], "--tasks must"),
                          (["--width", "unet"], "NAME=INTEGER")):
        with pytest.raises(SystemExit):
            main(["--preset", "quick", "--out", str(tmp_path), *argv])
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- optional matplotlib

#: One 1-D model on the "quick" preset: the smallest run of the command line.
QUICK_1D = ["--preset", "quick", "--no-progress", "--models", "coordgate"]


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib unimportable, as where it is not installed: a None entry in sys.modules makes
    importing it, or any of its submodules already loaded by an earlier test, raise ImportError."""
    for name in ["matplotlib"] + [n for n in sys.modules if n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def trainings(monkeypatch):
    """The label of every model that core.train is called on, in order."""
    labels = []
    real_train = core.train

    def recording_train(*args, **kwargs):
        labels.append(kwargs["label"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(core, "train", recording_train)
    return labels


def test_missing_matplotlib_stops_before_training(tmp_path, capsys, no_matplotlib, trainings):
    with pytest.raises(SystemExit):
        main([*QUICK_1D, "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert 'pip install "coordgate_ext[experiments]"' in error and "--no-figure" in error
    settings = PRESETS["quick"]()
    settings.out, settings.progress = str(tmp_path), False
    with pytest.raises(ImportError, match=r"needs matplotlib.*figure=False"):
        run(settings)
    assert trainings == [] and os.listdir(tmp_path) == []


def test_no_figure_runs_without_matplotlib(tmp_path, capsys, no_matplotlib, trainings):
    outcome = main([*QUICK_1D, "--out", str(tmp_path), "--no-figure"])
    printed = capsys.readouterr().out
    assert trainings == ["1d coordgate"]
    assert "CoordGate CNN" in printed and "figure:" not in printed
    assert outcome["paths"]["figure"] is None and not os.path.exists(tmp_path / "figure.png")
    saved = json.load(open(outcome["paths"]["json"]))
    assert saved["settings"]["figure"] is False
    assert [r["model"] for r in saved["tasks"]["1d"]["results"]] == ["coordgate"]


def test_results_are_written_before_the_figure(tmp_path, capsys, monkeypatch):
    def failing_figure(runs, path, example=0):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "save_figure", failing_figure)
    with pytest.raises(RuntimeError, match="plotting failed"):
        main([*QUICK_1D, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "CoordGate CNN" in printed and f"results: {tmp_path / 'results.json'}" in printed
    saved = json.load(open(tmp_path / "results.json"))
    assert [r["model"] for r in saved["tasks"]["1d"]["results"]] == ["coordgate"]
    assert os.path.exists(tmp_path / "checkpoints" / "1d-coordgate.pt")
