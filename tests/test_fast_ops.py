"""FastPath's newer switches (sdcn_trt.engines.fast_ops): each against the plain module on the CPU where it
means something there, their refusals elsewhere; the compiled CUDA kernels are GPU tests."""
import dataclasses
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdcn_trt.engines.fast_ops import (FastGroupNorm, SiLULinear, cuda_flags, fuse_group_norm_silu, parse_sdpa_kernels,
                                       sdpa_kernels_spelling)
from sdcn_trt.engines.torch import FastPath, TorchRunner, attention_modules
from sdcn_trt.errors import InputError
from sdcn_trt.export.descriptors import ShapeSpec, get_descriptor


def _outputs(runner, feed):
    return {k: v.detach().clone() for k, v in runner.infer(feed).items()}


@pytest.mark.parametrize("name", ["fused_step", "vae_decoder"])
def test_group_norm_silu_fusion_is_bit_identical_on_the_cpu(tiny, name):
    desc = get_descriptor(name, tiny)
    feed = desc.sample_inputs(ShapeSpec(1, 64, 64))
    expected = _outputs(TorchRunner(desc), feed)
    fused = TorchRunner(desc, fast=FastPath(gn_silu=True))
    actual = _outputs(fused, feed)
    for key in expected:  # the same ops in the same order: exactly equal
        assert torch.equal(actual[key], expected[key]), key
    norms = [m for m in fused.module.modules() if isinstance(m, FastGroupNorm)]
    assert norms and not any(m.compiled for m in norms)  # compiled on CUDA only
    plain_norms = [m for m in fused.module.modules() if type(m) is nn.GroupNorm]
    # left alone: the transformers' input norms (no SiLU after them) and the VAE mid attention's norm
    assert all(type(m) is not FastGroupNorm for m in plain_norms)
    if name == "fused_step":
        assert any(isinstance(m, SiLULinear) for m in fused.module.modules())  # the time projections


def test_group_norm_silu_keeps_state_dict_keys_and_counts_pairs(tiny):
    unet = get_descriptor("fused_step", tiny).build_module()
    import copy

    module = copy.deepcopy(unet)
    keys = set(module.state_dict())
    count = fuse_group_norm_silu(module, compiled=False)
    from diffusers.models.resnet import ResnetBlock2D

    blocks = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    assert count == 2 * len(blocks) + 1  # norm1 + norm2 per block, the UNet's conv_norm_out (ControlNet has none)
    assert set(module.state_dict()) == keys


def test_sdpa_backend_pinned_to_math_matches_auto_on_the_cpu(tiny):
    desc = get_descriptor("fused_step", tiny)
    feed = desc.sample_inputs(ShapeSpec(1, 64, 64))
    auto = _outputs(TorchRunner(desc, fast=FastPath(sdpa=True)), feed)["noise_pred"]
    math = _outputs(TorchRunner(desc, fast=FastPath(sdpa=True, sdpa_backend="math")), feed)["noise_pred"]
    torch.testing.assert_close(math, auto, rtol=1e-5, atol=1e-5)


def test_sdpa_backend_refused_where_it_cannot_run(tiny):
    desc = get_descriptor("fused_step", tiny)
    runner = TorchRunner(desc, fast=FastPath(sdpa=True, sdpa_backend="efficient"))  # no CPU kernel
    with pytest.raises(RuntimeError, match="No viable backend|No available kernel"):  # torch 2.14 / 2.11
        runner.infer(desc.sample_inputs(ShapeSpec(1, 64, 64)))


@pytest.mark.parametrize("spelling, kernels, canonical", [
    ("auto", {}, "auto"),
    ("flash", {None: "flash"}, "flash"),
    (" 160 = math , 40=flash", {160: "math", 40: "flash"}, "40=flash,160=math"),
    ("80=efficient,flash", {80: "efficient", None: "flash"}, "flash,80=efficient"),
    ("auto,40=flash", {40: "flash"}, "40=flash"),  # 'auto' for the rest: torch chooses, as unnamed sizes do
    ("40=auto,80=math", {80: "math"}, "80=math"),
    ("cudnn,40=auto", {None: "cudnn", 40: "auto"}, "cudnn,40=auto"),  # 40 left to torch, the rest cuDNN
])
def test_sdpa_kernels_per_head_size_are_parsed_and_spelled_one_way(spelling, kernels, canonical):
    assert parse_sdpa_kernels(spelling) == kernels
    assert sdpa_kernels_spelling(kernels) == canonical
    assert FastPath(sdpa=True, sdpa_backend=spelling) == FastPath(sdpa=True, sdpa_backend=canonical)
    assert FastPath(sdpa=True, sdpa_backend=spelling).sdpa_backend == canonical


@pytest.mark.parametrize("spelling, message", [
    ("x=flash", "head size 'x' in 'x=flash' is not a positive whole number; write head=kernel"),
    ("0=flash", "head size '0' in '0=flash' is not a positive whole number"),
    ("40=flash,40=math", "sdpa_backend '40=flash,40=math' names head size 40 twice"),
    ("flash,math", "names a kernel for the other head sizes twice"),
    ("40=fastest", "unknown sdpa_backend kernel for head size 40 'fastest'; choose one of auto, flash, efficient"),
    ("40=flash,", "unknown sdpa_backend ''; choose one of auto"),
    ("\u00b2=flash", "head size '\u00b2' in '\u00b2=flash' is not a positive whole number"),
])
def test_sdpa_kernels_per_head_size_errors_name_the_entry(spelling, message):
    with pytest.raises(InputError, match=re.escape(message)):
        FastPath(sdpa=True, sdpa_backend=spelling)


def test_sdpa_kernel_pinned_per_head_size(tiny):
    """The tiny fused step has attention at head sizes 4 and 8: '4=math' pins those at 4 and leaves 8 to
    torch; the images match auto; pinning 8 to a kernel the CPU lacks fails naming kernel and head size."""
    desc = get_descriptor("fused_step", tiny)
    feed = desc.sample_inputs(ShapeSpec(1, 64, 64))
    runner = TorchRunner(desc, fast=FastPath(sdpa=True, fuse_qkv=True, sdpa_backend="4=math"))
    pinned = _outputs(runner, feed)["noise_pred"]
    processors = {}
    for attn in attention_modules(runner.module):
        processors.setdefault(attn.inner_dim // attn.heads, set()).add(
            (type(attn.processor).__name__, getattr(attn.processor, "kernel", None)))
    assert processors == {4: {("PinnedSdpa", "math")}, 8: {("FusedAttnProcessor2_0", None)}}
    auto = _outputs(TorchRunner(desc, fast=FastPath(sdpa=True, fuse_qkv=True)), feed)["noise_pred"]
    torch.testing.assert_close(pinned, auto, rtol=1e-5, atol=1e-5)
    refusing = TorchRunner(desc, fast=FastPath(sdpa=True, sdpa_backend="4=math,8=efficient"))
    with pytest.raises(RuntimeError, match=r"pinned to the 'efficient' SDPA kernel \(head size 8, "
                                           r"FastPath.sdpa_backend\) cannot run here: .*(No viable backend|No available kernel)"):
        refusing.infer(feed)


def test_pinned_sdpa_leaves_other_errors_as_they_are():
    """Only a kernel's refusal gets the pinned kernel's name: out of memory stays torch.OutOfMemoryError
    (the loop's capture turns it into DeviceMemoryError) and any other error passes unchanged."""
    from sdcn_trt.engines.fast_ops import PinnedSdpa

    def failing(error):
        def processor(attn, *args, **kwargs):
            raise error
        return PinnedSdpa(processor, "math", 40)

    with pytest.raises(torch.OutOfMemoryError, match="^CUDA out of memory$"):
        failing(torch.OutOfMemoryError("CUDA out of memory"))(None)
    with pytest.raises(RuntimeError, match="^operation not permitted when stream is capturing$"):
        failing(RuntimeError("operation not permitted when stream is capturing"))(None)
    with pytest.raises(RuntimeError, match=r"pinned to the 'math' SDPA kernel \(head size 40.*No available kernel"):
        failing(RuntimeError("No available kernel. Aborting execution."))(None)


def test_fast_path_switch_errors_say_what_is_valid():
    with pytest.raises(InputError, match="unknown sdpa_backend 'fastest'; choose one of auto, flash, efficient, cudnn, math"):
        FastPath(sdpa=True, sdpa_backend="fastest")
    with pytest.raises(InputError, match="only calls with sdpa=True"):
        FastPath(sdpa_backend="flash")
    with pytest.raises(InputError, match="cudnn_benchmark and fp16_accumulation only act on CUDA, not on device 'cpu'"):
        FastPath(cudnn_benchmark=True, fp16_accumulation=True).check_device(torch.device("cpu"))


def test_cpu_runner_refuses_cuda_only_switches(tiny):
    runner = TorchRunner(get_descriptor("vae_decoder", tiny), fast=FastPath(cudnn_benchmark=True))
    with pytest.raises(InputError, match="cudnn_benchmark only act on CUDA"):
        runner.activate()


def test_cuda_flags_are_restored_after_the_call():
    matmul = torch.backends.cuda.matmul
    before = torch.backends.cudnn.benchmark, matmul.allow_fp16_accumulation
    with cuda_flags(cudnn_benchmark=True, fp16_accumulation=True):
        assert torch.backends.cudnn.benchmark and matmul.allow_fp16_accumulation
    assert (torch.backends.cudnn.benchmark, matmul.allow_fp16_accumulation) == before
    with pytest.raises(ValueError), cuda_flags(cudnn_benchmark=True, fp16_accumulation=False):
        raise ValueError("restored on errors too")
    assert torch.backends.cudnn.benchmark == before[0]


def test_channels_last_inputs_match_plain(tiny):
    desc = get_descriptor("fused_step", tiny)
    feed = desc.sample_inputs(ShapeSpec(1, 64, 64))
    expected = _outputs(TorchRunner(desc), feed)["noise_pred"]
    actual = _outputs(TorchRunner(desc, fast=FastPath(channels_last=True, gn_silu=True)), feed)["noise_pred"]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_compiled_group_norm_silu_matches_eager_on_cuda(tiny):
    desc = get_descriptor("fused_step", tiny)
    feed = desc.sample_inputs(ShapeSpec(1, 64, 64))
    expected = _outputs(TorchRunner(desc, "cuda", "fp16"), feed)["noise_pred"]
    fused = TorchRunner(desc, "cuda", "fp16", fast=FastPath(sdpa=True, fuse_qkv=True, gn_silu=True))
    actual = _outputs(fused, feed)["noise_pred"]
    assert all(m.compiled for m in fused.module.modules() if isinstance(m, FastGroupNorm))
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_compiled_group_norm_keeps_channels_last_on_cuda():
    """On CUDA the compiled FastGroupNorm of a channels_last fp16 input hands on channels_last (what CUDA's own
    GroupNorm cannot) and matches it; and the whole channels_last step matches the NCHW one."""
    from sdcn_trt.engines.fast_ops import compiled_group_norm_act, is_nhwc

    x = torch.randn(2, 320, 32, 48, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    weight, bias = torch.randn(320, device="cuda", dtype=torch.float16), torch.randn(320, device="cuda", dtype=torch.float16)
    out = compiled_group_norm_act()(x, 32, weight, bias, 1e-5, True, True)
    expected = F.silu(F.group_norm(x.float(), 32, weight.float(), bias.float(), 1e-5))
    assert is_nhwc(out) and not is_nhwc(F.group_norm(x, 32, weight, bias, 1e-5))
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_reads_and_writes_channels_last(silu, affine):
    """The NHWC formulation equals F.group_norm (+ SiLU) within float rounding and hands on channels_last
    memory (CUDA's own GroupNorm would copy to NCHW and back); NCHW inputs take F.group_norm: bit-identical."""
    from sdcn_trt.engines.fast_ops import group_norm_act, is_nhwc

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 12, 20, generator=gen) * 3 + 1
    weight, bias = (torch.randn(64, generator=gen), torch.randn(64, generator=gen)) if affine else (None, None)
    expected = F.group_norm(x, 32, weight, bias, 1e-5)
    expected = F.silu(expected) if silu else expected
    x_nhwc = x.to(memory_format=torch.channels_last)
    nhwc = group_norm_act(x_nhwc, 32, weight, bias, 1e-5, silu, nhwc=True)
    assert is_nhwc(nhwc) and is_nhwc(x_nhwc) and not is_nhwc(x)
    torch.testing.assert_close(nhwc, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(group_norm_act(x, 32, weight, bias, 1e-5, silu, nhwc=True), expected)
    # in a module that is not channels_last (nhwc=False) a channels_last input takes F.group_norm as well
    native = F.group_norm(x_nhwc, 32, weight, bias, 1e-5)
    assert torch.equal(group_norm_act(x_nhwc, 32, weight, bias, 1e-5, silu, nhwc=False), F.silu(native) if silu else native)


def test_channels_last_modules_keep_every_norm_and_transformer_output_nhwc(tiny):
    """With channels_last every GroupNorm becomes a FastGroupNorm (SiLU only where one followed) and every
    transformer hands its output on without diffusers' NCHW copy; the step still matches plain fp32."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    desc = get_descriptor("fused_step", tiny)
    runner = TorchRunner(desc, fast=FastPath(channels_last=True, gn_silu=True))
    runner.activate()
    modules = list(runner.module.modules())
    assert not any(type(m) is nn.GroupNorm for m in modules)
    plain = [m for m in modules if isinstance(m, FastGroupNorm) and not m.silu]
    transformers = [m for m in modules if isinstance(m, Transformer2DModel)]
    assert len(plain) == len(transformers) > 0  # each transformer's input norm: no SiLU after it
    assert all(m.nhwc for m in modules if isinstance(m, FastGroupNorm))
    assert all("_get_output_for_continuous_inputs" in vars(m) for m in transformers)
    nchw = TorchRunner(desc, fast=FastPath(gn_silu=True))
    nchw.activate()
    assert not any("_get_output_for_continuous_inputs" in vars(m) for m in nchw.module.modules())
    assert any(type(m) is nn.GroupNorm for m in nchw.module.modules())  # NCHW: the transformers' norms stay


def test_a_channels_last_step_changes_no_layout(tiny):
    """benchmarks.op_census on one tiny fused step (CPU fp32, the CUDA fp16 default's switches).

    channels_last, 2026-12-06: 344 operators, 3 copies (the latents and the hint made NHWC on entry, the
    ControlNet scales repeated over the CFG batch), 0 CUDA layout changes. Before (e0856d4): 9 copies and 12
    layout changes (each transformer's input GroupNorm copying to NCHW on CUDA, its `.contiguous()` output,
    the projection convolution then converting back), and the 25 GroupNorm+SiLU kernels compiled from
    F.group_norm, which takes the NCHW path on CUDA. NCHW: every one of the 53 convolutions converts."""
    from benchmarks.op_census import fused_step_census

    spec = ShapeSpec(1, 64, 64)
    nhwc = fused_step_census(tiny, FastPath(sdpa=True, fuse_qkv=True, channels_last=True, gn_silu=True), spec)
    assert (nhwc["copies"], nhwc["cuda_layout"]) == (3, 0), nhwc["sites"]
    assert {site.split(" @ ")[1].split(":")[0] for site in nhwc["sites"]} == {"torch.py", "networks.py"}
    nchw = fused_step_census(tiny, FastPath(sdpa=True, fuse_qkv=True, gn_silu=True), spec)
    convs = sum(1 for m in get_descriptor("fused_step", tiny).build_module().modules() if isinstance(m, nn.Conv2d))
    assert nchw["cuda_layout"] == convs == 53  # NCHW: cuDNN converts every convolution's input
    assert nchw["operators"] == nhwc["operators"]


def test_cross_kv_projects_the_text_once_per_image(tiny):
    """FastPath.cross_kv: after prepare() a call on that very text tensor takes every cross-attention's K/V from
    the prepared buffers (one GEMM fewer each, the same numbers); a call on another tensor projects again."""
    from benchmarks.op_census import fused_step_census
    from sdcn_trt.engines.fast_ops import TextProjection

    desc = get_descriptor("fused_step", tiny)
    feed = desc.sample_inputs(ShapeSpec(1, 64, 64))
    plain = _outputs(TorchRunner(desc, fast=FastPath(sdpa=True, fuse_qkv=True)), feed)["noise_pred"]
    runner = TorchRunner(desc, fast=FastPath(sdpa=True, fuse_qkv=True, cross_kv=True))
    runner.activate()
    kept = [m for m in runner.module.modules() if isinstance(m, TextProjection)]
    cross = [a for a in attention_modules(runner.module) if a.is_cross_attention]
    assert len(kept) == len(cross) > 0 and all(isinstance(a.to_kv, TextProjection) for a in cross)
    assert torch.equal(_outputs(runner, feed)["noise_pred"], plain)  # not prepared: projects as before
    runner.prepare(feed)
    assert torch.equal(_outputs(runner, feed)["noise_pred"], plain)  # prepared: the same numbers
    other = {**feed, "text_embeddings": feed["text_embeddings"] * 2}
    expected = _outputs(TorchRunner(desc, fast=FastPath(sdpa=True, fuse_qkv=True)), other)["noise_pred"]
    assert torch.equal(_outputs(runner, other)["noise_pred"], expected)  # another text: projected again
    assert torch.equal(_outputs(runner, feed)["noise_pred"], plain)  # and the prepared one is used again
    spec = ShapeSpec(1, 64, 64)
    base = FastPath(sdpa=True, fuse_qkv=True, channels_last=True, gn_silu=True)
    before = fused_step_census(tiny, base, spec)
    after = fused_step_census(tiny, dataclasses.replace(base, cross_kv=True), spec)
    assert before["operators"] - after["operators"] == len(kept)  # one projection per cross-attention, per step


@pytest.mark.parametrize("mode", ["off", "loop", "step"])
@pytest.mark.parametrize("schedule", ["full", "deepcache=2"])
def test_cross_kv_images_equal_the_plain_loops(tiny, photo, monkeypatch, mode, schedule):
    """The eager, static and per-step loops prepare each image's text once (per-step: outside the captured
    steps) and give the very images of the same loop without it, image after image (no stale projection)."""
    from types import SimpleNamespace

    from sdcn_trt import BackendConfig, ControlNetPipeline, GenerationConfig
    from sdcn_trt.engines.fast_ops import TextProjection
    from sdcn_trt.pipeline import pipeline as pipeline_module
    from sdcn_trt.pipeline.loop import GraphedSteps

    config = GenerationConfig(image_resolution=64, ddim_steps=4, seed=5, prompt="a cat", schedule=schedule)
    configs = [config, config.replace(prompt="a red house", seed=6), config]
    if mode == "step":
        monkeypatch.setattr(pipeline_module, "make_loop", lambda mode, key, schedule, runners, device: GraphedSteps(
            key, schedule, runners, device, capture_fn=lambda body, device, what: SimpleNamespace(replay=body)))
    backend = BackendConfig(cuda_graph="loop" if mode == "loop" else "off")
    plain = [ControlNetPipeline(tiny, backend).run(photo, c).images[0] for c in configs]
    monkeypatch.setattr(FastPath, "default_for", classmethod(lambda cls, device, dtype: cls(cross_kv=True)))
    projected = []
    real = TextProjection.forward
    monkeypatch.setattr(TextProjection, "forward", lambda self, x: (projected.append(self.prepared is None), real(self, x))[1])
    pipe = ControlNetPipeline(tiny, backend)
    images = [pipe.run(photo, c).images[0] for c in configs]
    assert all(np.array_equal(a, b) for a, b in zip(images, plain, strict=True))
    assert projected and not any(projected)  # every step took the prepared projections
    assert not np.array_equal(images[0], images[1])
