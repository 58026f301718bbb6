r"""Denoise a whole CT/MR volume with a trained conditional DDPM.

    python run_scripts/denoise.py --ckpt pretrained/cdm4mi_bundled_ct_mr.ckpt \
        --input scan.nii.gz|DICOM_FOLDER --output den.nii.gz [--std std.nii.gz] \
        [--output-dicom NEW_FOLDER] \
        [--sigma auto|VALUE] [--steps 10] [--samples 1] [--eta 0] \
        [--plane acquisition|axial|coronal|sagittal] [--modality ct|mr] \
        [--device cpu|cuda] [--batch-size 8] [--tile 256] [--overlap 32] [--seed 0] \
        [--precision fp32|bf16] [--channels-last] [--compile] [--cuda-graphs]

The output is a NIfTI volume in the input's units (HU for CT) with the input's shape and
affine; --std writes the per-voxel std of --samples posterior samples (needs --eta > 0).
A DICOM series folder input can also be written back as a DICOM series (--output-dicom, a
new or empty folder): one file per input slice, new series and instance UIDs, the input's
geometry and stored pixel representation.
--sigma is the noise std on the [0,1] scale the model was trained on (CT: HU -1024..3071,
MR: its foreground percentile window); "auto" estimates it from the scan and prints it in
the input's units too. Intensities outside that window are passed through unchanged; with
no measurable noise (sigma below half the noise of the model's smallest timestep) the whole
input is. --modality defaults to the DICOM Modality tag, else to what the intensities show
(air near -1000 HU: CT; no negative values: MR).
User errors (a bad flag or path) are one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse

import torch

from diffusion_modules.diffusion_utils.inference import PRECISIONS, InferenceOptions, check_device
from models.ddpm_conditioned import ConditionDDPM
from orchestration.checkpoints import load_checkpoint
from orchestration.cli import checked_device, user_error_boundary
from orchestration.volume_denoiser import check_output_paths, check_settings, denoise_volume
from utils.planes import ACQUISITION, PLANES


def sigma_arg(value: str):
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sigma must be 'auto' or a number, got {value!r}") from None


def main(argv: list[str] | None = None) -> dict:
    return user_error_boundary("denoise.py", lambda: run(argv))


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="ConditionDDPM checkpoint")
    parser.add_argument("--input", required=True, help="NIfTI file (.nii, .nii.gz) or DICOM series folder")
    parser.add_argument("--output", required=True, help="denoised NIfTI (.nii or .nii.gz)")
    parser.add_argument("--std", help="per-voxel std of the samples, NIfTI, input units")
    parser.add_argument("--output-dicom", metavar="FOLDER",
                        help="also write a DICOM series (new or empty folder; DICOM series input only)")
    parser.add_argument("--sigma", type=sigma_arg, default="auto", help="noise std on the [0,1] scale, or auto")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps from the matched start (network calls)")
    parser.add_argument("--samples", type=int, default=1, help="posterior samples averaged per slice")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]; > 0 for --samples > 1")
    parser.add_argument("--plane", default=ACQUISITION, choices=(ACQUISITION, *PLANES))
    parser.add_argument("--modality", choices=("ct", "mr"),
                        help="default: the DICOM Modality tag, else inferred from the intensities")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per network batch")
    parser.add_argument("--tile", type=int, default=256, help="largest tile side in pixels")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="network precision (bf16: autocast)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC network weights and inputs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (the first batch waits)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="compile with CUDA graphs (mode reduce-overhead; --device cuda only)")
    args = parser.parse_args(argv)
    if args.std and args.samples < 2:
        parser.error("--std needs --samples >= 2 (and --eta > 0): one sample has no spread")
    # every flag and path is checked before the checkpoint is read
    check_settings(args.sigma, args.steps, args.samples, args.eta, args.batch_size, args.tile, args.overlap)
    device = checked_device(args.device, "--device")
    inference = InferenceOptions(args.precision, args.channels_last, args.compile, args.cuda_graphs)
    if args.cuda_graphs and not str(device).startswith("cuda"):
        parser.error("--cuda-graphs needs --device cuda (CUDA graphs are a CUDA feature)")
    check_device(inference, torch.device(device))
    check_output_paths(args.input, args.output, args.std, args.output_dicom)
    model = load_checkpoint(ConditionDDPM, args.ckpt, map_location=device)
    model.requires_grad_(False)  # inference only: channels_last weights are converted once, CUDA graphs replay
    info = denoise_volume(model, args.input, args.output, std_path=args.std, output_dicom=args.output_dicom,
                          modality=args.modality, sigma=args.sigma, steps=args.steps, n_samples=args.samples,
                          eta=args.eta, plane=args.plane, batch_size=args.batch_size, tile=args.tile,
                          overlap=args.overlap, seed=args.seed, inference=inference)
    unit = "HU" if info["modality"] == "ct" else "scanner units"
    low, high = info["window"]
    print(f"modality: {info['modality']} ({info['modality_source']}); intensity window {low:.4g} .. {high:.4g} "
          f"{unit} (denoised; values outside it are passed through)")
    print(f"noise sigma: {info['sigma01']:.4g} on the [0,1] scale = {info['sigma_units']:.4g} {unit}"
          f" ({'estimated' if args.sigma == 'auto' else 'given'})"
          + (f"; matched start t* = {info['t_star']}" if info["t_star"] is not None else ""))
    if not inference.plain:
        print(f"network options: {inference.describe()}")
    if info["unchanged"]:
        print(f"not denoised: {info['unchanged']}; the input is written unchanged")
    context = (f" (2.5D: each with its {info['context_slices']} noisy neighbour(s) on each side)"
               if info.get("context_slices") else "")
    print(f"{info['slices']} {info['plane']} slices{context} in {info['seconds']:.1f} s; wrote {info['output']}")
    if info.get("context_warning"):
        print(f"note: {info['context_warning']}")
    if info.get("std"):
        print(f"std map: {info['std']}")
    if info.get("output_dicom"):
        print(f"DICOM series: {info['output_dicom']}")
    return info


if __name__ == "__main__":
    main()
