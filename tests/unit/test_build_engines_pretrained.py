import copy

import numpy as np
import pytest
import torch
import torchvision

from build_engines.pretrained import DEFAULT_PATH, load_imagenet_mobilenet_v2
from client.errors import MissingWeightsError

needs_tflite = pytest.mark.skipif(
    not DEFAULT_PATH.is_file(), reason=f"pretrained TFLite weights not found at {DEFAULT_PATH}"
)

# 52 feature convolutions x (conv weight + BN weight, bias, running mean, running var).
EXPECTED_TENSORS = 260


@needs_tflite
def test_loads_imagenet_features_but_keeps_the_fresh_head():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    assert load_imagenet_mobilenet_v2(model) == EXPECTED_TENSORS

    after = model.state_dict()
    assert not torch.equal(after["features.0.0.weight"], before["features.0.0.weight"])
    assert not torch.equal(after["features.18.0.weight"], before["features.18.0.weight"])
    assert not torch.equal(after["features.0.1.bias"], before["features.0.1.bias"])
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert all(k.startswith("features.") for k in changed)
    for k in ("classifier.1.weight", "classifier.1.bias"):
        assert torch.equal(after[k], before[k])
    # Folded batch norm: pass-through that only adds the bias.
    bn = model.features[0][1]
    assert torch.all(bn.weight == 1) and torch.all(bn.running_mean == 0)
    assert torch.allclose(bn.running_var + bn.eps, torch.ones_like(bn.running_var))

    model.eval()
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 2)
    assert torch.isfinite(out).all()


@needs_tflite
def test_rejects_a_model_that_does_not_match_the_file():
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=2, width_mult=0.5)
    with pytest.raises(ValueError, match="shape"):
        load_imagenet_mobilenet_v2(model)


def test_missing_file_is_a_missing_weights_error(tmp_path):
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=2)
    with pytest.raises(MissingWeightsError, match="not found"):
        load_imagenet_mobilenet_v2(model, tmp_path / "absent.tflite")


@needs_tflite
def test_batch_norm_calibration_keeps_the_function_and_the_last_layer_alive(data_dir):
    """Calibrated on real slices, training-mode batches start from the ImageNet function."""
    from build_engines.pretrained import calibrate_batch_norm
    from client.decode import decode_file
    from client.preprocess import normalize, preprocess
    from client.registry import get_model

    spec = get_model("mobilenet_v2")
    files = sorted((data_dir / "kaggle_head_ct" / "head_ct").glob("*.png"))[::10]
    inputs = np.stack([preprocess(decode_file(f), spec) for f in files])
    batch = torch.from_numpy(normalize(inputs, spec))
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=2)
    load_imagenet_mobilenet_v2(model)
    model.eval()
    with torch.no_grad():
        loaded = model.features(batch)

    uncalibrated = copy.deepcopy(model).train()
    calibrate_batch_norm(model, batch)

    with torch.no_grad():
        calibrated = model.features(batch)
        model.train()
        training_mode = model.features(batch)
        before = uncalibrated.features(batch)
    assert torch.allclose(calibrated, loaded, atol=1e-3, rtol=1e-3)
    alive = (loaded > 0).float().mean()
    assert (training_mode > 0).float().mean() > 0.8 * alive
    # Uncalibrated, training-mode normalization silenced most of the last layer.
    assert (before > 0).float().mean() < 0.5 * alive
    assert torch.corrcoef(torch.stack([training_mode.flatten(), loaded.flatten()]))[0, 1] > 0.9
