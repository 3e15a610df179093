"""Pixel metrics between a reference and an accelerated image: SSIM, PSNR, |difference|."""
from __future__ import annotations

import numpy as np

from sdcn_trt.errors import InputError


def image_metrics(reference: np.ndarray, image: np.ndarray) -> dict[str, float]:
    """SSIM (channel-wise, data range 255), PSNR (inf when identical), mean and max |difference|."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if reference.shape != image.shape:
        raise InputError(f"images differ in size: reference {reference.shape} vs image {image.shape}")
    diff = np.abs(reference.astype(np.int16) - image.astype(np.int16))
    identical = not diff.any()
    return {
        "ssim": 1.0 if identical else float(structural_similarity(reference, image, channel_axis=-1, data_range=255)),
        "psnr": float("inf") if identical else float(peak_signal_noise_ratio(reference, image, data_range=255)),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff": int(diff.max()),
    }
