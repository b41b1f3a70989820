"""The registry of trainee networks.

``small`` is the network learned optimizers are meta-trained on (1 conv + 1 fc, after
Roy & Todorovic 2018); ``big`` is the bigger network they are transferred to
(3 conv + 2 fc). Both are built for any ``(channels, height, width)`` input, so the same
names serve MNIST (1x28x28) and CIFAR-10 (3x32x32).

Any other destination network is named one of two more ways:

* a torchvision classification model (``resnet18``, ``resnet50``, ``vgg11``, ...), built
  untrained (``weights=None``) with ``num_classes`` from the dataset; these expect
  3-channel images (ImageNet's 3x224x224; CIFAR-10 works for the convolutional ones);
* a user factory ``package.module:function``, called with the keyword arguments it
  accepts among ``input_shape`` and ``num_classes``; it must return an ``nn.Module``.

Example:
    >>> net = build_network("small", input_shape=(1, 28, 28), num_classes=10)
    >>> sum(p.numel() for p in net.parameters())
    11738
"""

from __future__ import annotations

import importlib
import inspect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, UnknownNameError, ZooError

__all__ = [
    "NETWORKS",
    "NetworkSpec",
    "build_network",
    "count_parameters",
    "get_network",
    "torchvision_models",
]

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class NetworkSpec:
    """A registered network: how to build it and what it is."""

    name: str
    description: str
    factory: Callable[[Shape, int, float], nn.Module]
    layer_kinds: tuple[str, ...] = ("conv", "fc")


def _pooled(size: int, times: int) -> int:
    for _ in range(times):
        size //= 2
    return size


def _small(input_shape: Shape, num_classes: int, width: float = 1.0) -> nn.Module:
    channels, height, width_px = input_shape
    filters = max(1, round(8 * width))
    out_h, out_w = (height - 4) // 2, (width_px - 4) // 2
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(channels, filters, kernel_size=5),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(filters * out_h * out_w, num_classes),
        )
    )


def _big(input_shape: Shape, num_classes: int, width: float = 1.0) -> nn.Module:
    channels, height, width_px = input_shape
    c1, c2, c3 = (max(1, round(c * width)) for c in (16, 32, 32))
    hidden = max(1, round(128 * width))
    flat = c3 * _pooled(height, 3) * _pooled(width_px, 3)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(channels, c1, kernel_size=3, padding=1),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            conv3=nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            relu3=nn.ReLU(),
            pool3=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(flat, hidden),
            relu4=nn.ReLU(),
            fc2=nn.Linear(hidden, num_classes),
        )
    )


NETWORKS: dict[str, NetworkSpec] = {
    spec.name: spec
    for spec in (
        NetworkSpec(
            "small",
            "1 conv + 1 fc: Conv(8, 5x5)-ReLU-MaxPool(2)-Linear; the meta-training network",
            _small,
        ),
        NetworkSpec(
            "big",
            "3 conv + 2 fc: 3x[Conv(3x3, pad 1)-ReLU-MaxPool(2)] (16, 32, 32 filters)"
            "-Linear(128)-ReLU-Linear; the transfer target",
            _big,
        ),
    )
}


def torchvision_models() -> list[str]:
    """Names of torchvision's classification models (``resnet18``, ``vgg11``, ...)."""
    try:
        from torchvision import models
    except ImportError:  # torchvision is a dependency, but keep the registry importable
        return []
    return sorted(models.list_models(module=models))


def _torchvision_spec(name: str) -> NetworkSpec:
    def factory(input_shape: Shape, num_classes: int, width: float = 1.0) -> nn.Module:
        from torchvision import models

        if width != 1.0:
            raise ConfigError(f"width={width} is only supported by zoo's own networks, not {name}")
        if input_shape[0] != 3:
            raise ConfigError(
                f"{name} expects 3-channel images, got input shape {tuple(input_shape)}; "
                "use --dataset cifar10 or imagenet"
            )
        return models.get_model(name, weights=None, num_classes=num_classes)

    return NetworkSpec(name, f"torchvision.models.{name} (weights=None)", factory)


def _factory_spec(ref: str) -> NetworkSpec:
    module_name, _, attr = ref.partition(":")
    if not module_name.strip() or not attr.strip():
        raise UnknownNameError(
            f"network factory {ref!r} names no {'module' if not module_name.strip() else 'function'}"
            "; expected package.module:function, e.g. mypkg.nets:make"
        )
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise UnknownNameError(
            f"cannot load network factory {ref!r} ({error}); expected package.module:function "
            "importable from the current environment"
        ) from error
    except Exception as error:  # the module itself failed while importing
        raise ConfigError(
            f"importing network factory {ref!r} raised {type(error).__name__}: {error}; "
            f"fix the module {module_name}"
        ) from error
    if not callable(function):
        raise ConfigError(f"network factory {ref!r} is not callable")
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass nothing
        parameters = {}
    accepted = set(parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        accepted.add("num_classes")  # e.g. torchvision.models:resnet18(**kwargs)

    def factory(input_shape: Shape, num_classes: int, width: float = 1.0) -> nn.Module:
        if width != 1.0:
            raise ConfigError(f"width={width} is only supported by zoo's own networks, not {ref}")
        offered = {"input_shape": tuple(input_shape), "num_classes": num_classes}
        try:
            model = function(**{k: v for k, v in offered.items() if k in accepted})
        except ZooError:
            raise
        except Exception as error:
            raise ConfigError(
                f"network factory {ref!r} raised {type(error).__name__}: {error}; fix the "
                "factory (it is called with the keyword arguments it accepts among "
                "input_shape and num_classes)"
            ) from error
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"network factory {ref!r} returned {type(model).__name__}, not nn.Module"
            )
        _check_factory_model(ref, model, tuple(input_shape), num_classes)
        return model

    return NetworkSpec(ref, f"user factory {ref}", factory)


def _check_factory_model(ref: str, model: nn.Module, input_shape: Shape, num_classes: int):
    """A factory's model must have trainable parameters and ``num_classes`` outputs."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            f"network factory {ref!r} returned a model with no trainable parameters: "
            "there is nothing to optimize; return a model with parameters"
        )
    probe = torch.zeros(2, *input_shape)
    training = model.training
    try:
        model.eval()  # no batch-norm statistics are touched
        with torch.no_grad():
            output = model(probe)
    except Exception as error:
        raise ConfigError(
            f"network factory {ref!r}: its model fails on a batch of shape {tuple(probe.shape)} "
            f"({type(error).__name__}: {error}); it must take the dataset's inputs"
        ) from error
    finally:
        model.train(training)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
    if shape != (2, num_classes):
        raise ConfigError(
            f"network factory {ref!r}: its model maps a batch of shape {tuple(probe.shape)} to "
            f"{shape or type(output).__name__}, expected {(2, num_classes)} (one logit per "
            f"class); give it {num_classes} outputs (accept a num_classes argument)"
        )


def get_network(name: str) -> NetworkSpec:
    """The network ``name``: zoo's registry, a torchvision model, or ``package.module:function``.

    An unknown name is an ``UnknownNameError`` that lists the known ones.
    """
    if name in NETWORKS:
        return NETWORKS[name]
    if ":" in name:
        return _factory_spec(name)
    vision = torchvision_models()
    if name in vision:
        return _torchvision_spec(name)
    known = ", ".join(sorted(NETWORKS))
    examples = ", ".join(
        n for n in ("resnet18", "resnet50", "vgg11", "mobilenet_v2") if n in vision
    )
    raise UnknownNameError(
        f"unknown network {name!r}; known networks: {known}; torchvision models "
        f"({len(vision)}, e.g. {examples}); or a factory package.module:function"
    ) from None


def build_network(
    name: str, input_shape: Shape, num_classes: int = 10, width: float = 1.0
) -> nn.Module:
    """Build network ``name`` for inputs of ``input_shape`` with PyTorch's default init.

    ``width`` multiplies every layer's channel/unit count (meta-training samples it to
    present the update nets with networks of several widths); zoo's own networks only.
    """
    return get_network(name).factory(tuple(input_shape), num_classes, width)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def scale_init(model: nn.Module, scale: float) -> None:
    """Multiply every weight (not bias) of ``model`` by ``scale``, in place."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("bias"):
                p.mul_(scale)
