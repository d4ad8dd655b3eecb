"""Pillow-exact resizing in the one preprocessing function (data config ``pil-*`` interpolations)."""

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, write_image

from reid_export.data_config import INTERPOLATIONS, PIL_INTERPOLATIONS, DataConfig
from reid_export.errors import ReidExportError
from reid_export.preprocess import preprocess, read_image

FILTERS = {"pil-bilinear": Image.Resampling.BILINEAR, "pil-bicubic": Image.Resampling.BICUBIC,
           "pil-nearest": Image.Resampling.NEAREST, "pil-lanczos": Image.Resampling.LANCZOS,
           "pil-box": Image.Resampling.BOX, "pil-hamming": Image.Resampling.HAMMING}


@pytest.mark.parametrize("mode", PIL_INTERPOLATIONS)
@pytest.mark.parametrize("size", [(300, 100), (100, 40), (256, 128)])  # shrink, enlarge, unchanged
def test_pil_modes_equal_pillow_on_the_file(mode, size, tmp_path):
    """What torchreid's transform does: PIL open -> RGB -> Image.resize((w, h), filter)."""
    path = write_image(tmp_path / "a.jpg", seed=3, size=size)
    config = DataConfig(height=256, width=128, interpolation=mode)
    ours = preprocess([path], config)[0]
    theirs = np.asarray(Image.open(path).convert("RGB").resize((128, 256), FILTERS[mode]), dtype=np.float32)
    np.testing.assert_array_equal(ours, theirs.transpose(2, 0, 1))


def test_pil_bilinear_antialiases_where_opencv_does_not(tmp_path):
    """Shrinking 3x: Pillow's filter support widens, OpenCV's INTER_LINEAR samples 2x2 pixels."""
    path = write_image(tmp_path / "big.jpg", seed=5, size=(768, 384))
    pil = preprocess([path], DataConfig(interpolation="pil-bilinear"))[0]
    cv = preprocess([path], DataConfig(interpolation="linear"))[0]
    expected_cv = cv2.resize(read_image(path), (128, 256), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    np.testing.assert_array_equal(cv, expected_cv.transpose(2, 0, 1))
    assert np.abs(pil - cv).mean() > 1.0
    # the antialiased image is smoother (less energy in pixel-to-pixel differences)
    assert np.abs(np.diff(pil, axis=1)).mean() < np.abs(np.diff(cv, axis=1)).mean()


def test_arrays_and_normalisation_outside(tmp_path):
    """RGB arrays go through the same resize; mean/std outside the model follow the resize."""
    rgb = np.random.default_rng(0).integers(0, 256, (200, 90, 3), dtype=np.uint8)
    config = DataConfig(height=64, width=32, interpolation="pil-bicubic", pixel_scale=1.0,
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), normalized_inside=False)
    ours = preprocess([rgb], config)[0]
    resized = np.asarray(Image.fromarray(rgb).resize((32, 64), Image.Resampling.BICUBIC), np.float32) / 255
    expected = ((resized - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32))
    np.testing.assert_allclose(ours, expected.transpose(2, 0, 1), rtol=0, atol=1e-6)


def test_data_config_records_the_mode_and_rejects_unknown():
    assert set(PIL_INTERPOLATIONS) <= set(INTERPOLATIONS)
    config = DataConfig(interpolation="pil-bilinear")
    assert DataConfig.from_json(config.to_json()).interpolation == "pil-bilinear"
    assert json.loads(config.to_json())["interpolation"] == "pil-bilinear"
    with pytest.raises(ReidExportError, match="pil-bilinear"):
        DataConfig(interpolation="pil-bilinearr")


def test_annotate_offers_the_pil_modes():
    """An ONNX from elsewhere can be annotated with torchreid's resize."""
    result = run_cli("annotate", "--help")
    assert result.code == 0 and "pil-bilinear" in result.out
