"""Attention kernels, softmax(q k^T * scale) v over q (B, heads, Tq, d), k/v (B, heads, Tk, d).

flash: FlashAttention forward (Dao et al. 2022): one program per (query block, batch*head) walks the
    keys in tiles with an online softmax (running row max m, running sum l, rescaled accumulator),
    so the (Tq, Tk) score matrix never reaches memory. The whole head dim sits in one tile: d <= 128.
partial softmax ("Speed Is All You Need", arXiv 2304.11267, sec. 3.2): the scores S = q k^T * scale
    come from a matmul; kernel 1 reduces each row of S to its max and sum of exp; kernel 2 fuses the
    elementwise part, exp(S - max) / sum, into the product with V. Head dim is tiled: any d.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...errors import ConfigError
from ._common import check_launch, dot, dot_in_fp32

FLASH_MAX_HEAD_DIM = 128


@triton.jit
def _flash_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr,
                      sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
                      H, Tq, Tk, D, scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    lanes_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D

    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Tq) & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp(score - m_i) * v

    for start in range(0, Tk, BLOCK_N):
        offs_n = start + lanes_n
        n_ok = offs_n < Tk
        kt = tl.load(k_ptr + b * skb + h * skh + offs_n[None, :] * skt + offs_d[:, None] * skd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N) = k^T tile
        s = dot(q, kt, FP32) * scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * svb + h * svh + offs_n[:, None] * svt + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        p = p if FP32 else p.to(v.dtype)  # tl.dot operands share a dtype
        acc = acc * alpha[:, None] + dot(p, v, FP32)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < Tq) & d_ok[None, :])


@triton.jit
def _softmax_stats_kernel(s_ptr, max_ptr, sum_ptr, rows, Tk,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # s: (rows, Tk) contiguous fp32 scores; writes max_j s[i, j] and sum_j exp(s[i, j] - max) per row
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < rows
    lanes_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, Tk, BLOCK_N):
        offs_n = start + lanes_n
        s = tl.load(s_ptr + offs_m[:, None] * Tk + offs_n[None, :],
                    mask=m_ok[:, None] & (offs_n[None, :] < Tk), other=float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows stay finite
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m_i = m_new
    tl.store(max_ptr + offs_m, m_i, mask=m_ok)
    tl.store(sum_ptr + offs_m, l_i, mask=m_ok)


@triton.jit
def _softmax_v_kernel(s_ptr, max_ptr, sum_ptr, v_ptr, o_ptr,
                      svb, svh, svt, svd, sob, soh, sot, sod,
                      H, Tq, Tk, D,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      FP32: tl.constexpr):
    # one program per (query block, batch*head, head-dim block): o = (exp(S - max) / sum) @ v
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    lanes_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < Tq
    d_ok = offs_d < D
    rows = bh * Tq + offs_m  # row index into the (B*heads*Tq, Tk) scores
    row_max = tl.load(max_ptr + rows, mask=m_ok, other=0.0)
    row_sum = tl.load(sum_ptr + rows, mask=m_ok, other=1.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, Tk, BLOCK_N):
        offs_n = start + lanes_n
        n_ok = offs_n < Tk
        s = tl.load(s_ptr + rows[:, None] * Tk + offs_n[None, :],
                    mask=m_ok[:, None] & n_ok[None, :], other=float("-inf"))
        p = tl.exp(s - row_max[:, None]) / row_sum[:, None]  # (BLOCK_M, BLOCK_N), 0 where padded
        v = tl.load(v_ptr + b * svb + h * svh + offs_n[:, None] * svt + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        p = p if FP32 else p.to(v.dtype)  # tl.dot operands share a dtype
        acc += dot(p, v, FP32)
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
             acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def flash_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           *, block_m: int = 32, block_n: int = 32) -> torch.Tensor:
    """softmax(q k^T * scale) v with the FlashAttention forward; q/k/v (B, heads, T, d), d <= 128.

    Shapes are checked by `mobilediffusion.ops.attention` except the head-dim limit (checked here).
    """
    check_launch(_flash_fwd_kernel, "attention(flash)", q, k, v)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if D > FLASH_MAX_HEAD_DIM:
        raise ConfigError(f"attention(flash): head dim {D} (q shape {tuple(q.shape)}) is over "
                          f"{FLASH_MAX_HEAD_DIM}, the most one flash tile holds; use "
                          "variant='partial_softmax' (tiles the head dim) or the reference backend")
    out = torch.empty_like(q)  # (B, heads, Tq, d); strides passed, so any layout works
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(Tq, block_m), B * H)
    _flash_fwd_kernel[grid](q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                            H, Tq, Tk, D, float(scale),
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
                            FP32=dot_in_fp32(v.dtype, v.device))
    return out


def partial_softmax_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                                     *, block_m: int = 32, block_n: int = 32,
                                     block_d: int = 64) -> torch.Tensor:
    """softmax(q k^T * scale) v with the partially fused softmax; q/k/v (B, heads, T, d), any d."""
    check_launch(_softmax_v_kernel, "attention(partial_softmax)", q, k, v)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = torch.empty_like(q)  # (B, heads, Tq, d)
    if out.numel() == 0:
        return out
    # 1. scores in fp32 from a matmul: (B, heads, Tq, d) @ (B, heads, d, Tk) -> (B, heads, Tq, Tk)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale).contiguous()
    rows = B * H * Tq
    row_max = scores.new_empty(rows)
    row_sum = scores.new_empty(rows)
    # 2. reductions: row max and sum of exp
    _softmax_stats_kernel[(triton.cdiv(rows, block_m),)](scores, row_max, row_sum, rows, Tk,
                                                         BLOCK_M=block_m, BLOCK_N=block_n)
    # 3. exp(S - max) / sum fused into the product with V
    block_d = min(block_d, max(16, triton.next_power_of_2(D)))
    grid = (triton.cdiv(Tq, block_m), B * H, triton.cdiv(D, block_d))
    _softmax_v_kernel[grid](scores, row_max, row_sum, v, out, *v.stride(), *out.stride(),
                            H, Tq, Tk, D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                            FP32=dot_in_fp32(v.dtype, v.device))
    return out
