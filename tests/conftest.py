"""Test setup: without a GPU, Triton kernels run on the CPU through its interpreter."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
