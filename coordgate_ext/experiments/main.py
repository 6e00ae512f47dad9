"""The command line of the experiments and ``run(settings)``, its programmatic twin."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from . import report
from .core import MODELS_1D, MODELS_2D, PRESETS, Settings, run_task

EPILOG = """\
presets:
  demo   (default; what `make demo` runs) 2-D: 64x64 scenes, 1024 training pairs, 600 steps of
         16 per model; 1-D: 2048 signals of 128, 1000 steps of 32. About 5 minutes on 2 CPU cores.
  quick  a smoke test of a few seconds (tiny sizes; the numbers mean nothing).
  long   4000 / 5000 steps, 8x the data, twice the 2-D widths: the setting for conclusions
         (hours on a CPU; use --device cuda).

examples:
  python -m coordgate_ext.experiments                       # the demo
  python -m coordgate_ext.experiments --preset long --device cuda
  python -m coordgate_ext.experiments --tasks 2d --models unet,coordgate-unet --steps 1000
  python -m coordgate_ext.experiments --width coordgate-unet=16 --seed 1
  python -m coordgate_ext.experiments --no-figure           # without matplotlib

outputs (in --out):
  results.json      the settings and every model's scores; written, and the table printed,
                    before the figure is drawn, so a failure while plotting loses no result
  checkpoints/      one per model (--resume continues from them)
  figure.png        needs matplotlib, an optional dependency: pip install "coordgate_ext[experiments]"
                    (or pip install matplotlib). Without it the run stops before any training
                    and says so; --no-figure skips the figure instead.
"""


def _parse_widths(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, int]:
    widths = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            parser.error(f"--width expects NAME=INTEGER, got {item!r}")
        widths[name] = int(value)
    return widths


def parse_args(argv: list[str] | None = None) -> tuple[Settings, dict[str, list[str] | None]]:
    """Settings and the model names per task (None: all) from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m coordgate_ext.experiments",
        description="Train CoordGate and the usual alternatives on generated spatially varying "
        "blur (2-D restoration, 1-D operator learning); print a table, save results.json and a figure.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of 2d,1d (default: both)")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated model names; 2-D: {', '.join(MODELS_2D)}; 1-D: {', '.join(MODELS_1D)}")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (both tasks)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (both tasks)")
    parser.add_argument("--lr", type=float, default=None, help="Adam's initial learning rate (both tasks)")
    parser.add_argument("--n-train", type=int, default=None, help="training pairs (both tasks)")
    parser.add_argument("--size", type=int, default=None, help="2-D image side (a multiple of 4)")
    parser.add_argument("--width", action="append", default=[], metavar="NAME=W",
                        help="a model's base width (repeatable), e.g. coordgate-unet=16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    parser.add_argument("--out", default="results/experiments", help="directory for checkpoints, figure, JSON")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also save every N steps (0: at the end)")
    parser.add_argument("--resume", action="store_true", help="continue each model from its checkpoint in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-figure", action="store_true",
                        help="write the table and results.json only (no figure.png, no matplotlib needed)")
    args = parser.parse_args(argv)
    if not args.no_figure:
        try:
            report.require_plotting()
        except ImportError as error:
            parser.error(str(error))

    settings = PRESETS[args.preset]()
    if args.tasks is not None:
        tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        if not tasks or any(t not in ("2d", "1d") for t in tasks):
            parser.error(f"--tasks must name 2d and/or 1d, got {args.tasks!r}")
        settings.tasks = tasks
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: this torch has no usable CUDA device")
    settings = dataclasses.replace(settings, seed=args.seed, device=device, out=args.out,
                                   checkpoint_every=args.checkpoint_every, resume=args.resume,
                                   progress=not args.no_progress, figure=not args.no_figure)
    widths = _parse_widths(parser, args.width)
    unknown = set(widths) - set(MODELS_2D) - set(MODELS_1D)
    if unknown:
        parser.error(f"--width: unknown model(s) {', '.join(sorted(unknown))}")
    for name in ("task_2d", "task_1d"):
        task = getattr(settings, name)
        changes = {k: v for k, v in (("steps", args.steps), ("batch", args.batch), ("lr", args.lr),
                                     ("n_train", args.n_train)) if v is not None}
        if args.size is not None and name == "task_2d":
            changes["size"] = args.size
        task = dataclasses.replace(task, **changes)
        task.widths = {k: widths.get(k, v) for k, v in task.widths.items()}
        setattr(settings, name, task)

    names: dict[str, list[str] | None] = {"2d": None, "1d": None}
    if args.models is not None:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = set(wanted) - set(MODELS_2D) - set(MODELS_1D)
        if unknown:
            parser.error(f"--models: unknown model(s) {', '.join(sorted(unknown))}")
        names = {"2d": [m for m in wanted if m in MODELS_2D], "1d": [m for m in wanted if m in MODELS_1D]}
        settings.tasks = tuple(t for t in settings.tasks if names[t])
    return settings, names


def run(settings: Settings, names: dict[str, list[str] | None] | None = None) -> dict[str, dict]:
    """Runs every task of ``settings`` (see run_task), writes results.json into settings.out,
    prints the table and, if settings.figure, then saves figure.png. Returns {"runs": {task:
    run_task's output}, "paths": {"json": path, "figure": path or None}}.

    Raises ImportError before any training when the figure is wanted and matplotlib cannot
    be imported. Everything else is written before the figure is drawn, so an error while
    plotting loses no trained result."""
    names = names or {}
    if settings.figure:
        report.require_plotting()
    os.makedirs(settings.out, exist_ok=True)
    runs = {task: run_task(task, settings, names.get(task)) for task in settings.tasks}
    paths = {"json": os.path.join(settings.out, "results.json"), "figure": None}
    report.save_json(runs, paths["json"], settings)
    print()
    print(report.format_table(runs))
    print()
    print(f"results: {os.path.abspath(paths['json'])}", flush=True)
    if settings.figure:
        paths["figure"] = os.path.join(settings.out, "figure.png")
        report.save_figure(runs, paths["figure"])
        print(f"figure:  {os.path.abspath(paths['figure'])}")
    return {"runs": runs, "paths": paths}


def main(argv: list[str] | None = None) -> dict:
    """The command line: parses ``argv`` and runs (see run), then prints the total time."""
    start = time.perf_counter()
    settings, names = parse_args(argv)
    print(f"coordgate_ext experiments: tasks {', '.join(settings.tasks)}, device {settings.device}, "
          f"seed {settings.seed}, {torch.get_num_threads()} CPU threads", flush=True)
    outcome = run(settings, names)
    print(f"total wall time: {time.perf_counter() - start:.0f} s")
    return outcome
