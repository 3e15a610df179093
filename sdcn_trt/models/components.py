"""Components: the networks and the tokenizer of one SD + ControlNet model, and SD1.x constants.

Networks may be *lazy*: built on the meta device (configs and structure, no weights) with a loader
that fills them on first use. Reading `components.unet` (or any network) loads it; `peek(name)`
gives the network without loading it, for its config and structure. `weights_id()` names the
weights by where they came from (a source file's content hash, a preset and seed, ...), so caches
keyed by weights (ONNX exports, engines, compiled packages) need not read them.
"""
from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Callable, Sequence, Union

import torch

from sdcn_trt.cache import hash_json, hash_module
from sdcn_trt.errors import WeightsError

logger = logging.getLogger(__name__)

SD15_SCALING_FACTOR = 0.18215  # ldm's `scale_factor` for SD1.x latents
NETWORKS = ("text_encoder", "unet", "controlnet", "vae")
Loader = Callable[[str], dict[str, torch.Tensor]]  # network name -> its state dict, in the components' precision
WeightsKey = Union[str, Callable[[], str], None]


def is_empty(module: torch.nn.Module) -> bool:
    """True when the module's parameters are on the meta device (built without weights)."""
    return any(p.is_meta for p in module.parameters())


def _fingerprint(module: torch.nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version of every tensor: changes when a weight is replaced or modified."""
    prints = []
    for tensor in [*module.parameters(), *module.buffers()]:
        try:
            version = tensor._version
        except RuntimeError:  # inference tensors keep no version counter
            version = -1
        prints.append((id(tensor), version))
    return tuple(prints)


class Components:
    """The networks and the tokenizer of one SD + ControlNet model (torch, CPU).

    `precision`: the weights' precision, "fp32", or "fp16" for the UNet, ControlNet and VAE (the
    CLIP text encoder is always fp32). `source`: where the weights came from, for logs.
    `more_controlnets`: further ControlNets whose residuals add to the first's (Multi-ControlNet).
    `weights_key`: a content key of the weights' source (or a function computing it on first use);
    `loader`: fills the networks that are still empty (see `is_empty`).
    """

    def __init__(self, tokenizer: Any, text_encoder: Any, unet: Any, controlnet: Any, vae: Any,
                 source: str = "unknown", more_controlnets: Sequence[Any] = (), weights_key: WeightsKey = None,
                 loader: Loader | None = None, precision: str = "fp32"):
        self.tokenizer = tokenizer  # transformers.CLIPTokenizer
        self._networks: dict[str, Any] = {"text_encoder": text_encoder, "unet": unet, "controlnet": controlnet,
                                          "vae": vae}
        self.source = source
        self.more_controlnets = tuple(more_controlnets)
        self.precision = precision
        # the model folder's scheduler config (scheduler/scheduler_config.json) where it ships one: the table
        # samplers configure diffusers' schedulers from it (None: SD1.5's fields; DDIM is always ldm's)
        self.scheduler_config: dict[str, Any] | None = None
        self._key = weights_key
        self._loader = loader
        # fingerprints of the loaded networks while `weights_key` describes them
        self._prints = {n: _fingerprint(m) for n, m in self._networks.items() if not is_empty(m)}
        # module -> (fingerprint, hash_module) of its tensors when last hashed
        self._hashes: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[tuple[int, int], ...], str]] = (
            weakref.WeakKeyDictionary())
        missing = [n for n, m in self._networks.items() if is_empty(m)]
        if missing and loader is None:
            raise ValueError(f"networks {missing} have no weights (meta device) and no loader was given")
        check_controlnets(self.peek("unet"), (self.peek("controlnet"), *self.more_controlnets))

    # -- networks ---------------------------------------------------------------------------------
    @property
    def text_encoder(self) -> Any:  # transformers.CLIPTextModel
        return self.network("text_encoder")

    @property
    def unet(self) -> Any:  # diffusers.UNet2DConditionModel
        return self.network("unet")

    @property
    def controlnet(self) -> Any:  # diffusers.ControlNetModel: the first (canny) one
        return self.network("controlnet")

    @property
    def vae(self) -> Any:  # diffusers.AutoencoderKL
        return self.network("vae")

    @text_encoder.setter
    def text_encoder(self, module: Any) -> None:
        self.replace("text_encoder", module)

    @unet.setter
    def unet(self, module: Any) -> None:
        self.replace("unet", module)

    @controlnet.setter
    def controlnet(self, module: Any) -> None:
        self.replace("controlnet", module)

    @vae.setter
    def vae(self, module: Any) -> None:
        self.replace("vae", module)

    def replace(self, name: str, module: Any) -> None:
        """Put another network (with its weights) in place of `name`: `weights_key` no longer
        describes the weights, so cache keys hash them from now on."""
        if is_empty(module):
            raise ValueError(f"the new {name} has no weights (meta device)")
        self._networks[name] = module
        self._prints[name] = ()  # matches no fingerprint: the key is stale

    @property
    def controlnets(self) -> tuple[Any, ...]:
        """Every ControlNet, the first (the canny one, fed the edge map of the photo) first."""
        return (self.controlnet, *self.more_controlnets)

    @property
    def num_controlnets(self) -> int:
        return 1 + len(self.more_controlnets)

    def peek(self, name: str) -> Any:
        """Network `name` as it is now, without loading its weights: read its config and structure only."""
        return self._networks[name]

    def network(self, name: str) -> Any:
        """Network `name` with its weights, loading them first if it is still empty."""
        module = self._networks[name]
        if is_empty(module):
            assert self._loader is not None
            clock = time.perf_counter()
            module.load_state_dict(self._loader(name), strict=True, assign=True)
            module.eval().requires_grad_(False)
            self._prints[name] = _fingerprint(module)
            logger.info("%s: loaded %s weights (%s) in %.2f s", self.source, name, self.precision,
                        time.perf_counter() - clock)
        return module

    def is_loaded(self, name: str | None = None) -> bool:
        """Whether network `name` (default: every network) holds its weights."""
        names = [name] if name else list(NETWORKS)
        return not any(is_empty(self._networks[n]) for n in names)

    def materialize(self) -> "Components":
        """Load every network that is still empty."""
        for name in NETWORKS:
            self.network(name)
        return self

    def modules(self) -> dict[str, torch.nn.Module]:
        """Every network, loaded (further ControlNets as controlnet_1, controlnet_2, ...)."""
        extra = {f"controlnet_{k}": net for k, net in enumerate(self.more_controlnets, 1)}
        return {"text_encoder": self.text_encoder, "unet": self.unet, "controlnet": self.controlnet, **extra,
                "vae": self.vae}

    def eval_(self) -> "Components":
        for module in (*self._networks.values(), *self.more_controlnets):
            module.eval().requires_grad_(False)
        return self

    def with_more_controlnets(self, more: Sequence[Any], source: str) -> "Components":
        """These networks (shared, loaded or not) with `more` ControlNets in place of the further ones."""
        copy = Components(self.tokenizer, *(self._networks[n] for n in NETWORKS), source=source,
                          more_controlnets=more, weights_key=self._key, loader=self._loader, precision=self.precision)
        copy._prints = dict(self._prints)
        copy._hashes = self._hashes  # the same networks: the same hashes
        copy.scheduler_config = self.scheduler_config
        return copy

    # -- identity of the weights ------------------------------------------------------------------
    def with_weights_key(self, key: str) -> "Components":
        """Name the weights as they are now by `key` (a content key of where they came from)."""
        self._key = key
        self._prints = {n: _fingerprint(m) for n, m in self._networks.items() if not is_empty(m)}
        return self

    def weights_id(self, precision: str = "fp32") -> str:
        """A key of the weights a network exported at `precision` reads: the loader's content key
        while the loaded weights are untouched, else a hash of the tensors themselves.

        fp16 weights are fp32 weights rounded to fp16: the same key serves an fp16 export from
        either, while an fp32 export from fp16 weights gets a key of its own.
        """
        try:
            key = self._key() if callable(self._key) else self._key
        except OSError as exc:  # the source file is gone or unreadable: key the tensors instead
            logger.warning("%s: cannot key the weights by their source (%s); hashing them", self.source, exc)
            key = None
        self._key = key
        changed = [n for n, p in self._prints.items() if _fingerprint(self._networks[n]) != p]
        if key and not changed:
            key += ":fp16-weights" if self.precision == "fp16" and precision != "fp16" else ""
            if self.more_controlnets:  # loaded from their own files: keyed by their tensors
                key = hash_json([key, *(self._module_hash(net) for net in self.more_controlnets)])
            return key
        if key:
            logger.info("%s: weights of %s changed in place; hashing them for cache keys", self.source, changed)
        return hash_json({name: self._module_hash(module) for name, module in self.modules().items()})

    def _module_hash(self, module: torch.nn.Module) -> str:
        """hash_module(module), hashed again only when its tensors were replaced or changed in place."""
        prints = _fingerprint(module)
        known = self._hashes.get(module)
        if known is None or known[0] != prints:
            known = self._hashes[module] = (prints, hash_module(module))
        return known[1]

    # -- SD1.x values read off the configs ----------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.peek("vae").config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.peek("vae").config.scaling_factor)


def check_controlnets(unet: Any, controlnets: tuple[Any, ...]) -> None:
    """WeightsError unless every ControlNet's residuals fit the UNet: the same text width (SD1.x 768,
    SD2.x 1024), block widths and control-image channels."""
    for k, net in enumerate(controlnets):
        cfg, ucfg = net.config, unet.config
        what = f"ControlNet {k}" if len(controlnets) > 1 else "the ControlNet"
        if cfg.cross_attention_dim != ucfg.cross_attention_dim:
            raise WeightsError(f"{what} reads {cfg.cross_attention_dim}-wide text (SD2.x: 1024, SD1.x: 768); the UNet "
                               f"reads {ucfg.cross_attention_dim}-wide text: they belong to different base models")
        if tuple(cfg.block_out_channels) != tuple(ucfg.block_out_channels):
            raise WeightsError(f"{what} has block widths {tuple(cfg.block_out_channels)}; the UNet has "
                               f"{tuple(ucfg.block_out_channels)}: its residuals do not fit")
        if cfg.conditioning_channels != controlnets[0].config.conditioning_channels:
            raise WeightsError(f"{what} takes {cfg.conditioning_channels}-channel control images; ControlNet 0 takes "
                               f"{controlnets[0].config.conditioning_channels}")
