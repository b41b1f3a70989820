"""zoo: learned optimizers with pretrained checkpoints.

A second-order, coordinate-wise LSTM optimizer (Roy & Todorovic, ICPR 2018, on the design
of Andrychowicz et al., 2016): the curvature pass computes each parameter's gradient and
diagonal second derivative, and one small LSTM per layer kind (conv, fc) turns them into
the update.

    >>> import zoo
    >>> opt = zoo.load("lstm2-gh-mnist-small").attach(model)
    >>> loss = zoo.curvature.backward(model, inputs, target)
    >>> opt.step()
"""

__version__ = "0.1.0"

from . import curvature  # noqa: E402
from .checkpoint import PretrainedOptimizer, load_checkpoint, save_checkpoint  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    CurvatureError,
    CurvatureMissingError,
    DataError,
    HubError,
    NonFiniteError,
    UnknownNameError,
    ZooError,
)
from .features import FeatureSpec  # noqa: E402
from .networks import build_network  # noqa: E402
from .optimizer import LearnedOptimizer  # noqa: E402
from .update_net import UpdateNet  # noqa: E402

load = load_checkpoint

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CurvatureError",
    "CurvatureMissingError",
    "DataError",
    "FeatureSpec",
    "HubError",
    "LearnedOptimizer",
    "NonFiniteError",
    "PretrainedOptimizer",
    "UnknownNameError",
    "UpdateNet",
    "ZooError",
    "__version__",
    "build_network",
    "curvature",
    "load",
    "load_checkpoint",
    "save_checkpoint",
]
