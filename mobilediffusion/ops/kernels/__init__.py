"""Triton kernels and their launchers, one module per op. Importing any of them imports triton.

Launchers take CUDA tensors, or CPU tensors when triton runs its interpreter (TRITON_INTERPRET=1 set
before these modules are imported); the ops in `mobilediffusion.ops` call them for Backend.TRITON.
"""
