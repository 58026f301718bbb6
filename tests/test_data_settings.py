"""Patch settings are integers >= 1: anything else is a ValueError naming the key, from
save_as_hdf5 before any file is written and from the DataModule when its config is read
(before: int(64.5) was 64, int("64") 64 and True a patch size of 1, silently)."""
import re

import pytest

from diffusion_modules.diffusion_utils.datamodule import DenoisingDataModule
from synthetic import make_volume
from utils.create_training_images import save_as_hdf5

BAD = [(64.5, "64.5 (float)"), (16.0, "16.0 (float)"), ("16", "'16' (str)"), (True, "True (bool)"),
       (None, "None (NoneType)"), (0, "0"), (-8, "-8")]
KEYS = ["image_size", "stride", "slice_step"]


@pytest.mark.parametrize("value, shown", BAD, ids=[repr(b[0]) for b in BAD])
@pytest.mark.parametrize("key", KEYS)
def test_save_as_hdf5_refuses_a_setting_that_is_no_positive_integer(tmp_path, key, value, shown):
    source = make_volume(tmp_path / "head_ct.nii.gz", "ct")
    settings = {"image_size": 16, "stride": 8, "slice_step": 1, key: value}
    with pytest.raises(ValueError, match=rf"^{key} must be an integer >= 1, got {re.escape(shown)}$"):
        save_as_hdf5(source, "ct", tmp_path / "out", progress=False, **settings)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, shown", BAD, ids=[repr(b[0]) for b in BAD])
@pytest.mark.parametrize("key", KEYS)
def test_the_datamodule_refuses_it_when_the_config_is_read(tmp_path, key, value, shown):
    source = make_volume(tmp_path / "head_ct.nii.gz", "ct")
    settings = {"image_size": 16, "stride": 8, "slice_step": 1, key: value}
    with pytest.raises(ValueError, match=rf"^{key} must be an integer >= 1, got {re.escape(shown)}$"):
        DenoisingDataModule([str(source)], cache_dir=str(tmp_path / "cache"), **settings)
    assert not (tmp_path / "cache").exists()


def test_integers_of_other_types_are_accepted(tmp_path):
    import numpy as np

    source = make_volume(tmp_path / "head_ct.nii.gz", "ct")
    dm = DenoisingDataModule([str(source)], cache_dir=str(tmp_path / "cache"), image_size=np.int64(16),
                             stride=np.int32(8), split={"fractions": [0.6, 0.2, 0.2], "gap": 2})
    assert (dm.image_size, dm.stride) == (16, 8) and type(dm.image_size) is int
    dm.prepare_data()
    assert (tmp_path / "cache" / "head_ct.h5").is_file()
