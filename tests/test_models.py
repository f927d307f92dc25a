import pytest
import torch

from fedmr.errors import ConfigError
from fedmr.models import build_model, count_parameters


@pytest.mark.parametrize("name, classes, channels, side, params, keys", [
    ("cnn", 10, 3, 32, 62_006, 10),
    ("cnn_femnist", 62, 1, 28, None, 8),
    ("resnet20", 10, 3, 32, None, None),
    ("vgg16", 10, 3, 32, 33_646_666, None),
])
def test_models_shapes_and_parameter_counts(name, classes, channels, side, params, keys):
    model = build_model(name, classes, channels, side)
    if params is not None:
        assert count_parameters(model) == params
    if keys is not None:
        assert len(model.state_dict()) == keys
    model.eval()
    x = torch.randn(2, channels, side, side)
    out = model(x)
    assert out.shape == (2, classes)
    assert torch.allclose(model.head(model.features(x)), out)


def test_resnet20_is_the_papers_preactivation_bottleneck_net():
    model = build_model("resnet20", 10, 3, 32)
    assert 0.2e6 < count_parameters(model) < 0.24e6
    bn_scales = [m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn_scales and all(torch.all(w == 0.5) for w in bn_scales)
    assert model.linear.in_features == 256


def test_cnn_on_one_channel_for_the_digits():
    assert count_parameters(build_model("cnn", 10, 1, 32)) == 62_006 - 2 * 150


def test_model_errors():
    with pytest.raises(ConfigError, match="unknown model 'transformer'"):
        build_model("transformer", 10, 3)
    with pytest.raises(ConfigError, match="needs images of at least 16x16, the data set has 8x8"):
        build_model("cnn", 10, 3, 8)
    with pytest.raises(ConfigError, match="needs images of at least 32x32"):
        build_model("vgg16", 10, 3, 28)
    with pytest.raises(ConfigError, match=r"needs images, samples of shape \(C, H, W\)"):
        build_model("resnet20", 10, input_shape=(20,))


@pytest.mark.parametrize("name, shape, fc_in", [
    ("cnn", (1, 28, 28), 16 * 4 * 4), ("cnn", (3, 48, 48), 16 * 9 * 9), ("cnn", (3, 32, 32), 16 * 5 * 5),
    ("cnn", (3, 40, 24), 16 * 7 * 3), ("cnn_femnist", (1, 28, 28), 32 * 4 * 4), ("cnn_femnist", (3, 64, 64), 32 * 13 * 13),
])
def test_the_cnns_size_their_first_fc_layer_from_the_image(name, shape, fc_in):
    model = build_model(name, 7, input_shape=shape)
    assert model.fc1.in_features == fc_in
    model.eval()
    assert model(torch.randn(3, *shape)).shape == (3, 7)


@pytest.mark.parametrize("name, shape", [("resnet20", (1, 28, 28)), ("resnet20", (3, 48, 48)), ("vgg16", (3, 48, 48)),
                                         ("vgg16", (3, 64, 64))])
def test_resnet_and_vgg_take_other_image_sizes(name, shape):
    model = build_model(name, 5, input_shape=shape)
    model.eval()
    assert model(torch.randn(2, *shape)).shape == (2, 5)


@pytest.mark.parametrize("shape", [(20,), (8,), (3, 7), (1, 8, 8)])
def test_the_mlp_takes_any_sample_shape_and_integer_tokens(shape):
    model = build_model("mlp", 4, input_shape=shape)
    assert model(torch.randn(5, *shape)).shape == (5, 4)
    assert model(torch.randint(0, 9, (5, *shape))).shape == (5, 4)


def test_auto_never_refuses_a_shape_a_builtin_model_fits():
    from fedmr.models import auto_model

    assert auto_model("cnn", (1, 28, 28)) == "cnn" and auto_model("cnn", (3, 48, 48)) == "cnn"
    assert auto_model("cnn", (1, 8, 8)) == "mlp"  # too small for two 5x5 convolutions and pools
    assert auto_model("cnn", (20,)) == "mlp" and auto_model("cnn_femnist", (12, 5)) == "mlp"
