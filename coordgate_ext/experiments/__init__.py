"""The paper's experiments, built in: ``python -m coordgate_ext.experiments`` (``make demo``).

On data it generates itself (coordgate_ext.data), it trains each model with the same budget
and seed and prints a table of held-out PSNR, SSIM and MSE with parameter counts and training
times, then saves a figure and results.json:

- 2-D: restoring microscopy-like scenes blurred by a field-dependent PSF (plus Poisson-Gaussian
  noise) with a plain U-Net, a CoordConv U-Net, a MultiWienerNet-style model and a U-Net with
  CoordGate layers (coordgate_ext.nn.models);
- 1-D: learning a convolution whose kernel changes along the signal with a plain CNN, a
  CoordConv CNN and a CNN of FusedCoordGateConv1d layers.

``run(settings)`` is the same as the command line, for scripts and tests.
"""

from .core import MODELS_1D, MODELS_2D, PRESETS, Result, Settings, TaskSettings, run_task, train
from .main import main, run

__all__ = ["main", "run", "run_task", "train", "Settings", "TaskSettings", "Result", "PRESETS",
           "MODELS_2D", "MODELS_1D"]
