"""The run's outputs: the printed table, results.json and the PNG figure (the one part
that needs matplotlib, an optional dependency)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import torch


#: Names printed in the table and the figure.
LABELS = {
    "unet": "U-Net",
    "coordconv-unet": "CoordConv U-Net",
    "multiwiener": "MultiWienerNet",
    "coordgate-unet": "CoordGate U-Net",
    "conv": "CNN",
    "coordconv": "CoordConv CNN",
    "coordgate": "CoordGate CNN",
}


def format_table(runs: dict[str, dict]) -> str:
    """A plain-text table of every task's results, with the untouched input as a first row
    (for the 1-D task: the sharp signal scored against the blurred target)."""
    header = f"{'task':<4} {'model':<18} {'parameters':>10} {'PSNR (dB)':>10} {'SSIM':>7} {'MSE':>10} {'train (s)':>10}"
    lines = [header, "-" * len(header)]
    for task, run in runs.items():
        s = run["input_score"]
        lines.append(f"{task:<4} {'input (no model)':<18} {'-':>10} {s['psnr']:>10.2f} {s['ssim']:>7.4f} "
                     f"{s['mse']:>10.3e} {'-':>10}")
        for r in run["results"]:
            lines.append(f"{task:<4} {LABELS.get(r.model, r.model):<18} {r.parameters:>10,} {r.psnr:>10.2f} "
                         f"{r.ssim:>7.4f} {r.mse:>10.3e} {r.train_seconds:>10.1f}")
    return "\n".join(lines)


def save_json(runs: dict[str, dict], path: str, settings) -> None:
    """results.json: the settings and, per task, the input's score and each Result."""
    def finite(v):
        return v if not isinstance(v, float) or math.isfinite(v) else str(v)

    payload = {
        "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=str)),
        "tasks": {
            task: {"input": {k: finite(v) for k, v in run["input_score"].items()},
                   "results": [{k: finite(v) for k, v in dataclasses.asdict(r).items()} for r in run["results"]]}
            for task, run in runs.items()
        },
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


#: How to get the figure's one optional dependency, or do without it.
PLOTTING_FIX = ('pip install "coordgate_ext[experiments]" (or pip install matplotlib), or skip the '
                "figure: --no-figure on the command line, Settings(figure=False) in run()")


def require_plotting() -> None:
    """Raises ImportError, naming the fix, if save_figure could not import matplotlib; called
    before training so that a missing package costs seconds, not a whole run."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as error:
        raise ImportError(f"the figure needs matplotlib, which cannot be imported ({error}): "
                          f"{PLOTTING_FIX}") from error


def _show_image(ax, image: torch.Tensor, title: str, vmax: float) -> None:
    ax.imshow(image.clamp(min=0).numpy(), cmap="magma", vmin=0, vmax=vmax)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def save_figure(runs: dict[str, dict], path: str, example: int = 0) -> None:
    """The figure: for the 2-D task, a held-out scene (sharp, blurred and noisy, each model's
    restoration with its PSNR on that scene) and the gate maps learned by the CoordGate
    U-Net's first gated layer (six channels, each scaled to its own range); for the 1-D task,
    a held-out signal with the target and each model's output, and the CoordGate CNN's
    first-layer gate along the signal."""
    # A bare Figure, not pyplot: no global backend is switched in the caller's session.
    from matplotlib.figure import Figure

    from .. import metrics

    rows = []
    if "2d" in runs:
        rows += ["2d-images"] + (["2d-gates"] if "coordgate-unet" in runs["2d"]["models"] else [])
    if "1d" in runs:
        rows += ["1d"]
    run2 = runs.get("2d")
    columns = 2 + len(run2["results"]) if run2 else 4
    fig = Figure(figsize=(2.2 * columns, 2.4 * len(rows) + 0.4))
    grid = fig.add_gridspec(len(rows), columns)
    for row, kind in enumerate(rows):
        if kind == "2d-images":
            test = run2["test"]
            sharp, blurred = test.targets[example, 0], test.inputs[example, 0]
            vmax = sharp.max().item()
            _show_image(fig.add_subplot(grid[row, 0]), sharp, "sharp", vmax)
            p_in = metrics.psnr(test.inputs[example:example + 1], test.targets[example:example + 1]).item()
            _show_image(fig.add_subplot(grid[row, 1]), blurred, f"blurred + noise\n{p_in:.1f} dB", vmax)
            for col, r in enumerate(run2["results"], start=2):
                out = run2["predictions"][r.model][example:example + 1]
                p = metrics.psnr(out, test.targets[example:example + 1]).item()
                _show_image(fig.add_subplot(grid[row, col]), out[0, 0], f"{LABELS.get(r.model, r.model)}\n{p:.1f} dB",
                            vmax)
        elif kind == "2d-gates":
            layer = run2["models"]["coordgate-unet"].gate_layers()[0]
            size = run2["test"].targets.shape[-1]
            with torch.no_grad():
                gates = layer.gate_map(size, size).cpu()
            for col in range(min(columns, gates.shape[0])):
                ax = fig.add_subplot(grid[row, col])
                ax.imshow(gates[col].numpy(), cmap="coolwarm")
                ax.set_title(f"learned gate, channel {col}", fontsize=8)
                ax.axis("off")
        else:
            run1 = runs["1d"]
            test = run1["test"]
            ax = fig.add_subplot(grid[row, : columns - 2])
            ax.plot(test.inputs[example, 0].numpy(), color="0.6", lw=1, label="sharp input")
            ax.plot(test.targets[example, 0].numpy(), color="k", lw=1.5, label="target (varying blur)")
            for r in run1["results"]:
                ax.plot(run1["predictions"][r.model][example, 0].numpy(), lw=1,
                        label=f"{LABELS.get(r.model, r.model)} ({r.psnr:.1f} dB mean)")
            ax.set_xlabel("position")
            ax.legend(fontsize=7, ncol=2)
            ax.set_title("1-D: learning a convolution whose kernel changes along the signal", fontsize=8)
            model = run1["models"].get("coordgate")
            if model is not None:
                ax = fig.add_subplot(grid[row, columns - 2:])
                with torch.no_grad():
                    gate = model.convs[0].gate_map(test.inputs.shape[-1]).cpu()
                ax.imshow(gate.numpy(), aspect="auto", cmap="coolwarm")
                ax.set_xlabel("position")
                ax.set_ylabel("channel")
                ax.set_title("CoordGate CNN: first-layer gate", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
