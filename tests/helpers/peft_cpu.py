"""Test-only stand-in for peft's BOFT CUDA extension, so peft's real multi-factor butterfly code runs on the CPU."""

import torch


class CpuFastBlockDiag:
    """CPU stand-in for peft's ``fbd_cuda`` extension: ``(N, D, H, H)`` blocks -> ``(N, D·H, D·H)`` block-diagonal."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad_output, blocks):
        n, d, h, _ = blocks.shape
        grad = grad_output.reshape(n, d, h, d, h)
        idx = torch.arange(d)
        return [grad[:, idx, :, idx, :].permute(1, 0, 2, 3).contiguous()]
