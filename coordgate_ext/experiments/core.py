"""Settings, model construction, training and evaluation of the experiments.

One run trains each named model on the same generated data, from the same seed, with the same
optimiser and number of steps, and evaluates it on held-out data. The data are never
augmented by flips or rotations: the blur depends on the position in the field, and a flipped
image would come with the wrong PSFs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import data, metrics
from ..nn.models import MultiWienerNet, SignalNet, UNet, count_parameters

#: The 2-D models, in table order, and their default widths: the CoordGate U-Net is given the
#: smallest budget, as in the paper's comparison.
MODELS_2D = {"unet": 16, "coordconv-unet": 16, "multiwiener": 16, "coordgate-unet": 12}
#: The 1-D models and their default widths.
MODELS_1D = {"conv": 8, "coordconv": 8, "coordgate": 8}
#: Field positions (r, q) of MultiWienerNet's initial PSFs: a 3 x 3 grid over the field, the
#: calibration a MultiWienerNet user would measure.
WIENER_POSITIONS = (-1.0, 0.0, 1.0)


@dataclass
class TaskSettings:
    """What one task trains: steps per model, batch, learning rate (Adam, cosine decay to
    zero), dataset sizes, and the width of each model (name -> width)."""

    steps: int
    batch: int
    lr: float
    n_train: int
    n_test: int
    widths: dict[str, int]
    size: int = 64
    levels: int = 3


@dataclass
class Settings:
    """A whole run. ``tasks`` is a subset of ("2d", "1d"); ``out`` receives the checkpoints,
    the figure and results.json. ``figure`` False skips the figure, and with it the need
    for matplotlib."""

    tasks: tuple[str, ...] = ("2d", "1d")
    task_2d: TaskSettings = field(default_factory=lambda: TaskSettings(
        steps=600, batch=16, lr=2e-3, n_train=1024, n_test=128, widths=dict(MODELS_2D)))
    task_1d: TaskSettings = field(default_factory=lambda: TaskSettings(
        steps=1000, batch=32, lr=3e-3, n_train=2048, n_test=256, widths=dict(MODELS_1D), size=128))
    seed: int = 0
    device: str = "cpu"
    out: str = "results/experiments"
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool = True
    figure: bool = True


def _preset_quick() -> Settings:
    s = Settings()
    s.task_2d = TaskSettings(steps=6, batch=4, lr=2e-3, n_train=16, n_test=4,
                             widths={k: 4 for k in MODELS_2D}, size=32, levels=2)
    s.task_1d = TaskSettings(steps=6, batch=8, lr=3e-3, n_train=32, n_test=8,
                             widths={k: 4 for k in MODELS_1D}, size=64)
    return s


def _preset_long() -> Settings:
    s = Settings()
    s.task_2d = dataclasses.replace(s.task_2d, steps=4000, n_train=8192, n_test=512, lr=1e-3,
                                    widths={"unet": 32, "coordconv-unet": 32, "multiwiener": 32,
                                            "coordgate-unet": 24})
    s.task_1d = dataclasses.replace(s.task_1d, steps=5000, n_train=8192, n_test=1024)
    return s


#: Named settings: "demo" is what ``make demo`` runs (at most 10 minutes on 2 CPU cores),
#: "quick" a smoke test of seconds, "long" a run closer to the paper's (about 7x "demo"
#: steps on 2-D, 8x the data, twice the widths: hours on a CPU, minutes on a GPU).
PRESETS = {"demo": Settings, "quick": _preset_quick, "long": _preset_long}


# ----------------------------------------------------------------------------- models


def build_2d(name: str, width: int, levels: int, dataset: data.Dataset) -> nn.Module:
    """A 2-D restoration model by name (see MODELS_2D)."""
    if name == "unet":
        return UNet(1, 1, width, levels, "plain")
    if name == "coordconv-unet":
        return UNet(1, 1, width, levels, "coordconv")
    if name == "coordgate-unet":
        return UNet(1, 1, width, levels, "coordgate")
    if name == "multiwiener":
        grid = torch.tensor(WIENER_POSITIONS)
        r, q = torch.meshgrid(grid, grid, indexing="ij")
        psfs = data.field_psf(r, q, dataset.info["psf"])
        return MultiWienerNet(psfs, width, levels)
    raise ValueError(f"unknown 2-D model {name!r}; the models are {', '.join(MODELS_2D)}")


def build_1d(name: str, width: int) -> nn.Module:
    """A 1-D model by name (see MODELS_1D)."""
    kinds = {"conv": "plain", "coordconv": "coordconv", "coordgate": "coordgate"}
    if name not in kinds:
        raise ValueError(f"unknown 1-D model {name!r}; the models are {', '.join(MODELS_1D)}")
    return SignalNet(kinds[name], width)


# ----------------------------------------------------------------------------- training


class Progress:
    """A one-line progress bar on stderr, redrawn with a carriage return; where stderr is not
    a terminal (a log file), one line at each tenth instead."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last_tenth = -1

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        done = int(30 * step / self.total)
        line = (f"{self.label:<16} [{'#' * done}{'.' * (30 - done)}] {step}/{self.total} "
                f"loss {loss:.3e}  {rate:.1f} it/s  eta {eta:4.0f} s")
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        elif 10 * step // self.total > self.last_tenth:
            self.last_tenth = 10 * step // self.total
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


@dataclass
class Result:
    """One model's outcome: held-out means of PSNR (dB), SSIM and MSE, its parameter count,
    training seconds (this run's steps only) and the loss every tenth of the run."""

    task: str
    model: str
    parameters: int
    psnr: float
    ssim: float
    mse: float
    train_seconds: float
    losses: list[tuple[int, float]]


def _checkpoint_path(out: str, task: str, name: str) -> str:
    return os.path.join(out, "checkpoints", f"{task}-{name}.pt")


def train(
    model: nn.Module,
    train_set: data.Dataset,
    task: TaskSettings,
    *,
    seed: int,
    device: torch.device,
    label: str,
    checkpoint: str | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    progress: bool = True,
) -> tuple[float, list[tuple[int, float]]]:
    """Trains ``model`` in place on ``train_set`` with Adam (task.lr, cosine decay to zero
    over task.steps) and the MSE loss, on batches of task.batch pairs drawn at random (a
    generator seeded with ``seed``). Saves {model, optimizer, scheduler, step, sampler state}
    to ``checkpoint`` every ``checkpoint_every`` steps (0: only at the end); with ``resume``
    an existing checkpoint is loaded first and training continues from its step. Returns the
    training seconds and the (step, loss) pairs logged at each tenth of the run."""
    optimizer = torch.optim.Adam(model.parameters(), lr=task.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, task.steps)
    sampler = torch.Generator().manual_seed(seed)
    first = 0
    if resume and checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        sampler.set_state(state["sampler"])
        first = state["step"]

    def save(step: int) -> None:
        if checkpoint:
            os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": schedule.state_dict(), "sampler": sampler.get_state(),
                        "step": step}, checkpoint)

    inputs, targets = train_set.inputs.to(device), train_set.targets.to(device)
    bar = Progress(label, task.steps, progress)
    losses = []
    model.train()
    start = time.perf_counter()
    for step in range(first + 1, task.steps + 1):
        index = torch.randint(0, len(train_set), (task.batch,), generator=sampler).to(device)
        loss = F.mse_loss(model(inputs[index]), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, task.steps // 10) == 0 or step == task.steps:
            losses.append((step, loss.item()))
        if progress and (step % 5 == 0 or step == task.steps):
            bar.update(step, loss.item())
        if checkpoint_every and step % checkpoint_every == 0:
            save(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    save(task.steps)
    return seconds, losses


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, device: torch.device, batch: int = 64) -> torch.Tensor:
    """The model's outputs for ``inputs`` in eval mode, computed in batches, on the CPU."""
    model.eval()
    return torch.cat([model(inputs[i:i + batch].to(device)).cpu() for i in range(0, len(inputs), batch)])


def score(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Held-out means of PSNR, SSIM and MSE (data range one). A 1-D signal is scored as is."""
    return {
        "psnr": metrics.psnr(prediction, target).mean().item(),
        "ssim": metrics.ssim(prediction, target).mean().item(),
        "mse": metrics.mse(prediction, target).mean().item(),
    }


def make_data(task_name: str, task: TaskSettings, seed: int) -> tuple[data.Dataset, data.Dataset]:
    """(train, test) for "2d" or "1d"; the test set is made from its own seed (seed + 1), so
    it shares no item with the training set."""
    if task_name == "2d":
        return (data.make_microscopy_dataset(task.n_train, task.size, seed=seed),
                data.make_microscopy_dataset(task.n_test, task.size, seed=seed + 1))
    signal = data.SignalTask(length=task.size)
    return (data.make_signal_dataset(task.n_train, seed=seed, task=signal),
            data.make_signal_dataset(task.n_test, seed=seed + 1, task=signal))


def run_task(task_name: str, settings: Settings, names: list[str] | None = None) -> dict:
    """Trains and scores every model of one task. Returns {"results": [Result], "test":
    test set, "predictions": {name: tensor}, "models": {name: model}, "input_score": dict}."""
    task = settings.task_2d if task_name == "2d" else settings.task_1d
    device = torch.device(settings.device)
    t0 = time.perf_counter()
    train_set, test_set = make_data(task_name, task, settings.seed)
    if settings.progress:
        print(f"[{task_name}] generated {len(train_set)} training and {len(test_set)} test pairs "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    names = list(task.widths) if names is None else names
    results, predictions, models = [], {}, {}
    for name in names:
        # Each model's initialisation comes from the run's seed, whatever ran before it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            if task_name == "2d":
                model = build_2d(name, task.widths[name], task.levels, train_set)
            else:
                model = build_1d(name, task.widths[name])
        model.to(device)
        seconds, losses = train(
            model, train_set, task, seed=settings.seed, device=device, label=f"{task_name} {name}",
            checkpoint=_checkpoint_path(settings.out, task_name, name),
            checkpoint_every=settings.checkpoint_every, resume=settings.resume,
            progress=settings.progress,
        )
        prediction = predict(model, test_set.inputs, device)
        results.append(Result(task_name, name, count_parameters(model), **score(prediction, test_set.targets),
                              train_seconds=seconds, losses=losses))
        predictions[name], models[name] = prediction, model
    return {"results": results, "test": test_set, "predictions": predictions, "models": models,
            "input_score": score(test_set.inputs, test_set.targets)}

