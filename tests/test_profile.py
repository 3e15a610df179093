"""benchmarks.profile: the kernel categoriser and table on names from real GPU traces and on a real CPU trace."""
import json

import pytest
import torch

from benchmarks.profile import KINDS, Kernel, categorise, kernel_table, kernels_from, main, markdown, step_bytes

# names as CUPTI reports them (cuDNN, cuBLAS on Hopper, flash attention, PyTorch's own, inductor's Triton)
NAMES = {
    "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
    "cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false, true, (cudnnKernelDataType_t)0>": "copies/layout",
    "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT": "GEMM",
    "ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_tn": "GEMM",
    "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::half_t>>": "attention",
    "fmha_cutlassF_f16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::half_t>::Params)": "attention",
    "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half>(long, c10::Half, c10::Half const*)": "other",
    "void at::native::(anonymous namespace)::GroupNormKernel<float>": "normalisation",
    "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel(at::TensorIteratorBase&)": "elementwise",
    "void at::native::elementwise_kernel<128, 2, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)": "copies/layout",
    "Memcpy DtoD (Device -> Device)": "copies/layout",
    "triton_poi_fused_add_convolution_0": "elementwise",
    "triton_red_fused_convolution_native_group_norm_silu_3": "normalisation",
    "triton_tem_fused_mm_5": "GEMM",
    "aten::mkldnn_convolution": "convolution",
    "aten::addmm": "GEMM",
    "aten::native_layer_norm": "normalisation",
    "aten::cat": "copies/layout",
    "aten::silu": "elementwise",
}


@pytest.mark.parametrize("name, kind", NAMES.items())
def test_kernel_names_fall_into_their_kind(name, kind):
    assert categorise(name) == kind


def test_kernel_table_counts_and_times_per_step():
    kernels = [Kernel("aten::mkldnn_convolution", 300.0), Kernel("aten::addmm", 100.0),
               Kernel("aten::mkldnn_convolution", 500.0), Kernel("aten::silu", 100.0)] * 2  # two steps
    table = kernel_table(kernels, steps=2, top=2)
    assert table["kernels_per_step"] == 4 and table["busy_ms_per_step"] == pytest.approx(1.0)
    assert table["kinds"]["convolution"] == {"kernels": 2, "ms": pytest.approx(0.8), "share": pytest.approx(0.8)}
    assert table["kinds"]["GEMM"]["ms"] == pytest.approx(0.1) and table["kinds"]["attention"]["kernels"] == 0
    assert [t["name"] for t in table["top"]] == ["aten::mkldnn_convolution", "aten::addmm"]  # silu ties addmm: first seen
    assert table["top"][0]["calls_per_step"] == 2 and table["top"][0]["share"] == pytest.approx(0.8)
    assert kernel_table([], steps=1)["busy_ms_per_step"] == 0.0


def test_cpu_trace_keeps_innermost_operators():
    from torch.profiler import ProfilerActivity, profile

    x, w = torch.randn(1, 4, 8, 8), torch.randn(8, 4, 3, 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = torch.nn.functional.conv2d(x, w)
        torch.nn.functional.silu(y.reshape(1, -1) @ torch.randn(288, 5))
    names = [k.name for k in kernels_from(prof.events(), "cpu")]
    # conv2d -> convolution -> _convolution are wrappers; reshape is a view; mm / silu / randn remain
    assert "aten::conv2d" not in names and "aten::reshape" not in names and "aten::empty" not in names
    assert sum(categorise(n) == "convolution" for n in names) == 1
    assert {"aten::mm", "aten::silu"} <= set(names)


def test_step_bytes_counts_reads_and_writes_not_views():
    x = torch.zeros(10, 10)  # 400 bytes
    assert step_bytes(lambda: x + 1) == 400 + 400  # x and the result (1 stays a Python number)
    assert step_bytes(lambda: x * torch.ones(10)) == 40 + (400 + 40 + 400)  # ones writes 40, then the product
    assert step_bytes(lambda: x.view(100)) == 0


def test_profile_of_the_tiny_step_on_a_cpu_trace(tmp_path):
    assert main(["--device", "cpu", "--preset", "tiny", "--repeats", "1", "--height", "64", "--width", "64",
                 "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("profile-cpu-tiny-*.json")).read_text())
    row = report["backends"]["torch fp32"]
    assert row["mode"].startswith("eager") and row["kernels_per_step"] > 50
    assert sum(v["kernels"] for v in row["kinds"].values()) == pytest.approx(row["kernels_per_step"])
    assert sum(v["share"] for v in row["kinds"].values()) == pytest.approx(1.0)
    assert all(row["kinds"][kind]["kernels"] > 0 for kind in ("convolution", "GEMM", "attention", "normalisation"))
    assert row["bytes_per_step"] > 0 and report["copy_gbps"] > 0 and set(row["kinds"]) == set(KINDS)
    assert "kernels per step" in markdown(report)


def test_profile_refuses_cuda_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    from sdcn_trt.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="device 'cuda' was asked for but torch sees no CUDA GPU"):
        main(["--device", "cuda", "--preset", "tiny", "--out", str(tmp_path)])
