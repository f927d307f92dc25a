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
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("mlp", 10, 3)
    with pytest.raises(ConfigError, match="needs 32x32"):
        build_model("cnn", 10, 3, 28)
