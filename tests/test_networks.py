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
    kinds = lambda net: [type(m).__name__ for m in net.modules() if type(m).__name__ in ("Conv2d", "Linear")]  # noqa: E731
    assert kinds(small) == ["Conv2d", "Linear"]
    assert kinds(big) == ["Conv2d"] * 3 + ["Linear"] * 2


def test_unknown_network_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown network 'huge'; known networks: big, small"):
        build_network("huge", (1, 28, 28))
