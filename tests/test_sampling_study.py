"""The sampling study's rows: every NFE/K row is a PSNR, and the calibration numbers are
a correlation and a fraction."""
from pathlib import Path

import numpy as np

from models.ddpm_conditioned import ConditionDDPM
from evaluation.sampling_study import study_slice

ROOT = Path(__file__).resolve().parents[1]


def test_study_slice_rows():
    model = ConditionDDPM.load_from_checkpoint(str(ROOT / "pretrained" / "cdm4mi_bundled_ct_mr.ckpt"), map_location="cpu").eval()
    yy, xx = np.mgrid[:32, :32]
    clean = np.where((yy - 16) ** 2 + (xx - 16) ** 2 < 150, 0.6, 0.0) + 0.2 * (xx / 32)
    sigma = 0.02  # t* is small, so the ancestral row from t* is cheap
    noisy = (clean + sigma * np.random.default_rng(0).standard_normal(clean.shape)).astype(np.float32)
    if model.context_slices:  # a 2.5D model: a one-slice volume's neighbours are the slice itself
        noisy = np.repeat(noisy[None], 1 + 2 * model.context_slices, axis=0)
    out = study_slice(model, clean, noisy, sigma, nfe=[1, 2], k=[1, 3], k_steps=2, ancestral_from_noise=False)
    t_star = model.start_timestep("auto", sigma)
    expected = {("DDIM eta 0 from t*", 1), ("DDIM eta 0 from t*", 2), ("DDIM eta 0 from pure noise", 1),
                ("DDIM eta 0 from pure noise", 2), ("ancestral DDPM from t*", t_star + 1),
                ("mean of K, eta 1, 2 steps", 1), ("mean of K, eta 1, 2 steps", 3)}
    assert set(out) - {"calibration"} == expected
    # the matched start keeps the image; pure noise through a model trained on t <= 400 does not
    assert out[("DDIM eta 0 from t*", 1)] > out[("DDIM eta 0 from pure noise", 1)] + 10
    assert all(np.isfinite(v) for k, v in out.items() if k != "calibration")
    corr, within = out["calibration"]
    assert -1 <= corr <= 1 and 0 < within <= 1


def test_the_script_gives_a_2p5d_checkpoint_its_noisy_neighbours():
    """sampling_study.py on the shipped checkpoint (2.5D since issue 17): the evaluation's
    noisy stacks reach the model, and the matched start denoises both modalities."""
    from synthetic import load_script

    results = load_script("sampling_study.py").main(["--slices", "1", "--nfe", "1", "--k", "1", "--k-steps", "1",
                                                     "--ancestral-slices", "0", "--sigma", "0.03"])
    assert set(results) == {"ct", "mr"}
    noisy_psnr = -20 * np.log10(0.03)  # about 30.5 dB
    for rows in results.values():
        assert rows[0][("DDIM eta 0 from t*", 1)] > noisy_psnr + 3
