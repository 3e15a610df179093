"""PD: the L2 distance of pytorch-fid InceptionV3 pool3 features of two image files, as the contest."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from sdcn_trt.errors import InputError, WeightsError
from sdcn_trt.models.weights import sniff

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_ENV = "SDCN_FID_WEIGHTS"


def find_fid_weights(path: str | Path | None = None) -> Path:
    """The FID Inception weights: `path`, else $SDCN_FID_WEIGHTS, else torch hub's cache."""
    candidates = [Path(p) for p in (path, os.environ.get(FID_WEIGHTS_ENV)) if p]
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise WeightsError(
        f"FID Inception weights not found (looked at: {', '.join(str(c) for c in candidates)}). Download "
        f"{FID_WEIGHTS_FILE} from pytorch-fid's release page on a machine with internet access and pass "
        f"--fid-weights PATH, set {FID_WEIGHTS_ENV}, or put it in {candidates[-1].parent}"
    )


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights for the same architecture (tests and offline demos, not real PD)."""
    from torchvision.models import inception_v3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    return model.state_dict()


class PDScorer:
    """pytorch-fid's InceptionV3 (2048-d pool3 block, FID weights, resize_input and normalize_input)."""

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", random_seed: int | None = None):
        """Real FID weights from `weights`/$SDCN_FID_WEIGHTS/hub cache, or, with `random_seed`, random ones."""
        import pytorch_fid.inception as inception

        if random_seed is not None:
            state = random_inception_state(random_seed)
            self.weights = f"random(seed={random_seed})"
        else:
            path = find_fid_weights(weights)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                kind, description = sniff(path)  # torch's own message is pages about weights_only
                said = f"looks like {description}" if kind == "other" else str(exc).strip().splitlines()[0]
                raise WeightsError(f"cannot read FID weights {path} ({said}); expected pytorch-fid's "
                                   f"{FID_WEIGHTS_FILE}") from exc
            self.weights = str(path)
        original = inception.load_state_dict_from_url
        inception.load_state_dict_from_url = lambda *args, **kwargs: state  # pytorch-fid would download
        try:
            block = inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]
            self.model = inception.InceptionV3([block], resize_input=True, normalize_input=True).eval().to(device)
        except RuntimeError as exc:
            raise WeightsError(f"FID weights {self.weights} do not fit pytorch-fid's InceptionV3: {exc}") from exc
        finally:
            inception.load_state_dict_from_url = original
        if random_seed is not None:
            _calibrate_batchnorm(self.model, random_seed)
        self.device = device

    def features(self, path: str | Path) -> np.ndarray:
        """(2048,) pool3 features of an image file, read as pytorch-fid reads it (PIL, RGB, [0, 1])."""
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.functional import to_tensor

        try:
            image = Image.open(path).convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(f"cannot read image {path}: {exc}") from exc
        with torch.no_grad():
            out = self.model(to_tensor(image).unsqueeze(0).to(self.device))[0]
        return out.squeeze(-1).squeeze(-1)[0].cpu().numpy()

    def pd(self, reference: str | Path, image: str | Path) -> float:
        """PD = || f(image) - f(reference) ||_2."""
        return float(np.linalg.norm(self.features(image) - self.features(reference)))


def _calibrate_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Set a random network's BatchNorm statistics from a few seeded inputs, so its features stay
    O(1) like a trained network's instead of growing layer after layer."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 299, 299, generator=gen))
    model.eval()
