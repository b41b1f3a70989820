import pytest
import torch

from zoo.errors import UnknownNameError
from zoo.networks import NETWORKS, build_network, count_parameters


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_network_maps_images_to_logits(name, shape):
    net = build_network(name, shape, num_classes=10)
    out = net(torch.zeros(2, *shape))
    assert out.shape == (2, 10)


def test_parameter_counts_match_the_readme():
    assert count_parameters(build_network("small", (1, 28, 28))) == 11_738
    assert count_parameters(build_network("big", (1, 28, 28))) == 52_330
    assert count_parameters(build_network("small", (3, 32, 32))) == 16_298
    assert count_parameters(build_network("big", (3, 32, 32))) == 81_290


def test_layer_counts_are_as_named():
    small = build_network("small", (1, 28, 28))
    big = build_network("big", (1, 28, 28))

    def kinds(net):
        names = (type(m).__name__ for m in net.modules())
        return [n for n in names if n in ("Conv2d", "Linear")]

    assert kinds(small) == ["Conv2d", "Linear"]
    assert kinds(big) == ["Conv2d"] * 3 + ["Linear"] * 2


def test_unknown_network_lists_the_known_ones():
    with pytest.raises(
        UnknownNameError, match="unknown network 'huge'; known networks: big, small"
    ):
        build_network("huge", (1, 28, 28))


FACTORIES = """
import torch.nn as nn
def good(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))
def noparams():
    return nn.Sequential(nn.Flatten(), nn.Identity())
def bad_out():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 7))
def boom():
    raise RuntimeError("factory exploded")
"""


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (":make", r"network factory ':make' names no module; expected package.module:function"),
        ("zoo_qa_nets:", r"names no function"),
        ("zoo_qa_nets:noparams", r"'zoo_qa_nets:noparams' returned a model with no trainable"),
        (
            "zoo_qa_nets:bad_out",
            r"'zoo_qa_nets:bad_out': its model maps .* to \(2, 7\), "
            r"expected \(2, 10\)",
        ),
        ("zoo_qa_nets:boom", r"'zoo_qa_nets:boom' raised RuntimeError: factory exploded; fix"),
    ],
)
def test_bad_factories_are_clean_errors_naming_the_factory(ref, message, tmp_path, monkeypatch):
    from zoo.errors import ZooError

    (tmp_path / "zoo_qa_nets.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ZooError, match=message):
        build_network(ref, (1, 28, 28), 10)
    assert count_parameters(build_network("zoo_qa_nets:good", (1, 28, 28), 10)) == 7850


def test_torchvision_builder_as_a_factory_gets_num_classes():
    model = build_network("torchvision.models:resnet18", (3, 32, 32), 7)
    assert model.fc.out_features == 7
