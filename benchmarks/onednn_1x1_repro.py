# oneDNN (torch CPU) bug: backward of a 1x1, stride-2 convolution with 4 input channels, float32, channels_last,
# in oneDNN's AVX2 kernels (jit_1x1:avx2, backward_weights): 1 thread -> "free(): invalid next size" or "double free or
# corruption", 2 threads -> hangs in jit_avx2_1x1_convolution_bwd_weights_t. Torch 2.14.1, oneDNN 3.12.0, on a 2-core AMD
# EPYC with AVX2 only (2026-11-26), and on a 2-core AMD EPYC with avx512_bf16 under ONEDNN_MAX_CPU_ISA=AVX2 (2026-11-29).
# The contiguous format runs cleanly.
import sys
import torch
fmt = torch.channels_last if sys.argv[1] == "channels_last" else torch.contiguous_format
torch.manual_seed(0)
w = torch.randn(8, 4, 1, 1).contiguous(memory_format=fmt).requires_grad_()
for _ in range(10):
    x = torch.randn(8, 4, 24, 24).contiguous(memory_format=fmt)
    torch.nn.functional.conv2d(x, w, stride=2).sum().backward()
print("ok", fmt, torch.__version__, torch.backends.mkldnn.is_available())
