# oneDNN (torch CPU) bug: backward of a 1x1, stride-2 convolution with 8 input channels, float32, channels_last,
# in oneDNN's AVX-512 kernels (brgconv_strided:avx512_core, backward_data) -> Segmentation fault (exit 139).
# Crashes (torch 2.14.1, oneDNN 3.12.0):
#   2-core Intel Xeon, avx512f + avx512_vnni, no avx512_bf16: 8->16 and 8->8 channels at 64 and 96 px, 1 or 2 threads
#   2-core AMD EPYC (family 25, model 17), avx512_bf16: 8->16 at 48 and 96 px, also with ONEDNN_MAX_CPU_ISA=AVX512_CORE;
#     clean with ONEDNN_MAX_CPU_ISA=AVX2 (which has its own bug at 2-7 channels: onednn_1x1_repro.py), and at 16
#     input channels (2026-11-29)
# The contiguous format runs cleanly. Usage: python onednn_avx512_1x1_repro.py [channels_last|contiguous] [px]
import sys
import torch
fmt = torch.contiguous_format if sys.argv[1:2] == ["contiguous"] else torch.channels_last
size = int(sys.argv[2]) if len(sys.argv) > 2 else 96
w = torch.randn(16, 8, 1, 1).contiguous(memory_format=fmt).requires_grad_()
for _ in range(5):
    x = torch.randn(32, 8, size, size).contiguous(memory_format=fmt).requires_grad_()
    torch.nn.functional.conv2d(x, w, stride=2).sum().backward()
print("ok", fmt, size, torch.__version__)
