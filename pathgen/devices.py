"""The compute device, shared by every stage that holds models (selection, evaluation, captioning backends)."""

from __future__ import annotations


def empty_cuda_cache() -> None:
    """Hand the CUDA allocator's cached blocks back to the device (nothing to do without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
