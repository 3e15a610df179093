"""Scoring the way the TensorRT Hackathon 2023 did: PD, SSIM/PSNR, latency, the contest score, reports;
`tune` (`sdcn-trt tune`) and its report. Inner layers: contest, latency, metrics, pd, report, run →
tune_report → tune."""
from sdcn_trt.scoring.contest import contest_score, pd_factor, t_factor
from sdcn_trt.scoring.metrics import image_metrics
from sdcn_trt.scoring.pd import FID_WEIGHTS_ENV, FID_WEIGHTS_FILE, PDScorer

__all__ = ["FID_WEIGHTS_ENV", "FID_WEIGHTS_FILE", "PDScorer", "contest_score", "image_metrics", "pd_factor", "t_factor"]
