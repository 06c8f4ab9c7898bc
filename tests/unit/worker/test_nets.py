"""The networks (docs/workloads.md §3, §7, §8): parameter counts, names and order, shapes, loading by name."""

from __future__ import annotations

import pytest
import torch
from mlds_contract.campaign import Dataset, Images, Shape, Variant
from mlds_contract.plan import DEFAULT_SHAPE, DS5_GRID
from mlds_worker.nets import DigitsCNN, GRUNet, build_model, count_parameters
from safetensors.torch import load, save
from torch import nn

from tests.train_fixtures import gru_unit, image_unit


def part_count(model: nn.Module, prefix: str) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefix))


def test_default_gru_net_has_the_spec_parameter_count_per_part() -> None:
    net = GRUNet(DEFAULT_SHAPE)
    assert count_parameters(net) == 4364
    assert part_count(net, "gru.") == 3636
    assert part_count(net, "linear.") == 624
    assert part_count(net, "out.") == 104


def test_gru_net_parameter_names_and_order_are_the_dataset_format() -> None:
    names = [name for name, _ in GRUNet(DEFAULT_SHAPE).named_parameters()]
    gru = [f"gru.{kind}_l{layer}" for layer in range(4) for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    linear = [f"linear.{i}.{kind}" for i in range(4) for kind in ("weight", "bias")]
    assert names == [*gru, *linear, "out.weight", "out.bias"]
    # The state dict holds exactly the parameters, in the same order (no buffers to trip strict loading).
    assert list(GRUNet(DEFAULT_SHAPE).state_dict()) == names


def test_gru_net_parts_are_what_the_spec_lists() -> None:
    net = GRUNet(DEFAULT_SHAPE)
    assert (net.gru.input_size, net.gru.hidden_size, net.gru.num_layers, net.gru.batch_first) == (9, 12, 4, True)
    linear = [layer for layer in net.linear if isinstance(layer, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linear] == [(12, 12)] * 4
    assert (net.out.in_features, net.out.out_features) == (12, 8)
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_gru_net_maps_every_step_to_eight_outputs() -> None:
    net = GRUNet(DEFAULT_SHAPE)
    assert net(torch.zeros(5, 50, 9)).shape == (5, 50, 8)


def test_gru_net_starts_from_a_zero_hidden_state_so_sequences_are_independent() -> None:
    net = GRUNet(DEFAULT_SHAPE)
    a, b = torch.rand(1, 20, 9), torch.rand(1, 20, 9)
    together = net(torch.cat([a, b]))
    torch.testing.assert_close(together[1:], net(b))


def test_the_output_layer_has_no_activation_and_hidden_layers_use_tanh() -> None:
    net = GRUNet(DEFAULT_SHAPE)
    with torch.no_grad():
        net.out.bias.fill_(5.0)  # beyond tanh's range: only reachable without an output activation
        net.out.weight.zero_()
        assert torch.all(net(torch.rand(2, 3, 9)) == 5.0)
        net.out.weight.fill_(1.0)
        net.out.bias.zero_()
        for layer in net.linear:
            assert isinstance(layer, nn.Linear)
            layer.bias.fill_(100.0)
        # Each output sums 12 hidden values that tanh squeezes to (almost exactly) 1.
        torch.testing.assert_close(net(torch.rand(2, 3, 9)), torch.full((2, 3, 8), 12.0))


@pytest.mark.parametrize("shape", DS5_GRID, ids=lambda s: s.slug)
def test_ds5_shapes_have_the_gru_formula_count(shape: Shape) -> None:
    h, g, lin = shape.hidden, shape.gru_layers, shape.linear_layers
    gru = 3 * h * (9 + h) + 6 * h + (g - 1) * (3 * h * (h + h) + 6 * h)
    expected = gru + lin * (h * h + h) + (h * 8 + 8)
    assert count_parameters(GRUNet(shape)) == expected


def test_a_saved_model_loads_into_a_fresh_net_by_name_strictly() -> None:
    trained = GRUNet(DEFAULT_SHAPE)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    blob = save(trained.state_dict())
    fresh = GRUNet(DEFAULT_SHAPE)
    fresh.load_state_dict(load(blob), strict=True)
    x = torch.rand(3, 7, 9)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


def test_loading_into_the_wrong_shape_fails_loudly() -> None:
    blob = save(GRUNet(Shape(gru_layers=2, hidden=8, linear_layers=2)).state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):
        GRUNet(DEFAULT_SHAPE).load_state_dict(load(blob), strict=True)


@pytest.mark.parametrize(
    ("size", "expected"),
    [pytest.param((8, 8), 3658, id="digits-8x8"), pytest.param((28, 28), 26698, id="mnist-28x28")],
)
def test_digits_cnn_parameter_count_follows_the_input_size(size: tuple[int, int], expected: int) -> None:
    # conv1 8*9+8, conv2 16*8*9+16, fc1 (16*H/4*W/4)*32+32, fc2 32*10+10
    net = DigitsCNN(size)
    assert count_parameters(net) == expected
    assert [n for n, _ in net.named_parameters()] == [
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "conv2.bias",
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    ]
    assert net(torch.zeros(4, 1, *size)).shape == (4, 10)


def test_digits_cnn_refuses_images_too_small_to_pool_twice() -> None:
    with pytest.raises(ValueError, match="at least 4x4"):
        DigitsCNN((3, 8))


def test_build_model_picks_the_network_of_the_dataset() -> None:
    assert count_parameters(build_model(gru_unit(Dataset.ds1))) == 4364
    assert count_parameters(build_model(gru_unit(Dataset.ds3))) == 4364
    ds5 = build_model(gru_unit(Dataset.ds5, shape=Shape(gru_layers=2, hidden=8, linear_layers=2)))
    assert isinstance(ds5, GRUNet)
    assert ds5.gru.num_layers == 2
    assert ds5.gru.hidden_size == 8
    cnn = build_model(image_unit(Variant.clean))
    assert isinstance(cnn, DigitsCNN)
    assert cnn.image_size == (8, 8)
    mnist = image_unit(Variant.clean).model_copy(update={"images": Images.mnist})
    assert count_parameters(build_model(mnist)) == 26698
    assert count_parameters(build_model(mnist, image_size=(8, 8))) == 3658
