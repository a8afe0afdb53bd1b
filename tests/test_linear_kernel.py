"""`fast_linear` / `apply_linear`: float32 CPU linear layers on oneDNN, the same results as `F.linear` up to rounding,
and `F.linear` (or the module itself) wherever the fast kernel would change what the caller asked for."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeling_qwen_vl.modeling_qwen_vl import _ONEDNN_LINEAR, apply_linear, fast_linear

needs_onednn = pytest.mark.skipif(not _ONEDNN_LINEAR, reason="oneDNN linear kernels need an x86 CPU build of PyTorch")


def kernels(call) -> set[str]:
    """The names of the operators `call()` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        call()
    return {event.name for event in profile.events()}


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (2, 5, 48), "transposed"])
def test_matches_f_linear_in_value_and_gradients(shape, bias):
    generator = torch.Generator().manual_seed(0)
    if shape == "transposed":
        x = torch.randn(3, 48, 6, generator=generator).transpose(1, 2)  # a non-contiguous input
    else:
        x = torch.randn(*shape, generator=generator)
    weight = torch.randn(40, 48, generator=generator)
    b = torch.randn(40, generator=generator) if bias else None
    leaves = [t.clone().requires_grad_() for t in (x, weight) + ((b,) if bias else ())]
    reference = [t.detach().clone().requires_grad_() for t in leaves]

    out = fast_linear(leaves[0], leaves[1], leaves[2] if bias else None)
    expected = F.linear(reference[0], reference[1], reference[2] if bias else None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad_output = torch.randn(expected.shape, generator=generator)
    out.backward(grad_output)
    expected.backward(grad_output)
    for mine, theirs in zip(leaves, reference):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-4)

    assert "mkldnn::_linear_pointwise" in kernels(lambda: fast_linear(x, weight, b))
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in kernels(lambda: fast_linear(leaves[0], leaves[1], None))


@needs_onednn
def test_falls_back_where_the_fast_kernel_would_change_the_call():
    x, weight = torch.randn(4, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast computes linear layers in bfloat16
        assert fast_linear(x, weight).dtype == torch.bfloat16
    with torch.backends.mkldnn.flags(enabled=False):
        assert "mkldnn::_linear_pointwise" not in kernels(lambda: fast_linear(x, weight))
    assert "mkldnn::_linear_pointwise" not in kernels(lambda: fast_linear(x.double(), weight.double()))


@needs_onednn
def test_apply_linear_calls_wrapped_and_hooked_layers_as_modules():
    layer = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    assert "mkldnn::_linear_pointwise" in kernels(lambda: apply_linear(layer, x))

    seen = []
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    assert "mkldnn::_linear_pointwise" not in kernels(lambda: apply_linear(layer, x))
    assert seen == [(3, 8)]  # the hook ran
    handle.remove()

    quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)[0]
    assert type(quantized) is not nn.Linear
    torch.testing.assert_close(apply_linear(quantized, x), quantized(x))

    class Scaled(nn.Linear):  # a subclass (as wrappers and adapters are) keeps its own forward
        def forward(self, inputs):
            return 2 * super().forward(inputs)

    scaled = Scaled(16, 8)
    torch.testing.assert_close(apply_linear(scaled, x), scaled(x))


@needs_onednn
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile on CPU needs a C++ compiler",
)
def test_compiled_inference_keeps_the_onednn_kernel():
    """Under `torch.compile`, inference calls oneDNN through the custom op `qwen_vl::onednn_linear` (one graph, no
    break) with `F.linear`'s values; compiled training differentiates `F.linear` and matches it too."""
    x, weight, bias = torch.randn(3, 5, 48), torch.randn(40, 48), torch.randn(40)
    compiled = torch.compile(fast_linear, fullgraph=True, backend="aot_eager")
    try:
        with torch.no_grad():
            assert "qwen_vl::onednn_linear" in kernels(lambda: compiled(x, weight, bias))
            torch.testing.assert_close(compiled(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        leaf = weight.clone().requires_grad_()
        compiled(x, leaf, bias).sum().backward()
        torch.testing.assert_close(leaf.grad, x.flatten(0, 1).sum(0).expand(40, -1), rtol=1e-5, atol=1e-4)
    finally:
        torch._dynamo.reset()
