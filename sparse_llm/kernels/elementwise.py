"""Fused elementwise kernels of the decoder step: RMSNorm (with the residual add), RoPE on q and k, SiLU·mul.

Why: at decode batch 64 the elementwise work is tiny but the torch code runs it as ~30 kernels per layer
(RMSNorm alone is cast, pow, mean, add, rsqrt, mul, cast, mul); in a CUDA graph each still costs a few
microseconds. These kernels do each step in one launch with the *same rounding points* as the torch code
(the references: models/layers.py RMSNorm and silu_and_mul, models/rotary.py apply_rotary): in bf16/fp16
RoPE and the residual add are bit-identical to it; RMSNorm and SiLU differ only where a float32-level
difference (reduction order, the GPU's approximate rsqrt/exp) moves a value across a rounding boundary.

- rms_norm(x, w, eps): y = w * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)          (HF LlamaRMSNorm)
- fused_add_rms_norm(x, residual, w, eps): r = (x + residual).to(dtype); y = rms_norm(r)
  written in place: r into `residual`, y into `x` (vLLM's pattern; x is the previous sublayer's output)
- rotary_qk(q, k, cos, sin): neox "rotate_half" RoPE on q and k in one launch, each product rounded
  to the storage dtype as torch does; outputs may alias the inputs (in place)
- silu_and_mul(gate_up): silu(gate).to(dtype) * up, gate/up the two halves of the last dim

Every kernel computes in float32 and takes any row stride (views into a fused projection's output);
the last dim must be contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_llm.kernels.geometry import next_pow2

MAX_NORM_DIM = 65536  # one program holds a whole row in registers
SILU_BLOCK = 1024
# No FMA contraction in RoPE: fma(x, cos, p2) would skip the rounding of x * cos that torch's separate ops do.
ROTARY_COMPILE_OPTIONS = {"enable_fp_fusion": False}


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name}.dtype={t.dtype}: expected float32, float16 or bfloat16 (the kernels compute in float32)")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(-1)})")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors may share an element: exact for equal-strided row views of one buffer (e.g. two
    column ranges of a fused projection output), otherwise conservative (their memory spans intersect)."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        start = t.data_ptr()
        return start, start + t.element_size() * (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())))

    (a0, a1), (b0, b1) = span(a), span(b)
    if not (a0 < b1 and b0 < a1):
        return False
    ra, rb = _row_view(a), _row_view(b)
    if ra is None or rb is None or ra[2] != rb[2] or a.element_size() != b.element_size():
        return True
    (rows_a, width_a, stride), (rows_b, width_b, _) = ra, rb
    d = (b0 - a0) // a.element_size()  # b's row i starts d elements after a's row i
    # a's row i and b's row i - r share an element iff -width_b < d - r * stride < width_a (only r near d / stride)
    return any(
        -rows_b < r < rows_a and -width_b < d - r * stride < width_a for r in (d // stride, d // stride + 1)
    )


def _row_view(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows, contiguous width, row stride) if t is rows of one contiguous block each, no two rows overlapping."""
    if t.dim() < 2:
        return None
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return None
        expected *= size
    if t.shape[0] > 1 and t.stride(0) < expected:
        return None
    return t.shape[0], expected, max(t.stride(0), expected)


def _rows_3d(name: str, t: torch.Tensor) -> tuple[int, int, int, int]:
    """[T, N] or [T, H, N] as (T, H, stride_t, stride_h)."""
    if t.dim() == 2:
        return t.shape[0], 1, t.stride(0), 0
    if t.dim() == 3:
        return t.shape[0], t.shape[1], t.stride(0), t.stride(1)
    raise ValueError(f"{name} has shape {tuple(t.shape)}: expected [tokens, dim] or [tokens, heads, dim]")


# --- RMSNorm ------------------------------------------------------------------------------------------
@triton.jit
def _normed_store(r, X, W, OUT, out_off, offs, mask, N, eps):
    """OUT[row] = w * (r * rsqrt(mean(r^2) + eps)).to(X's dtype); r float32 with zeros past N."""
    var = tl.sum(r * r, axis=0) / N
    y = (r * tl.rsqrt(var + eps)).to(X.dtype.element_ty).to(tl.float32)  # HF: cast back to x's dtype before w
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + out_off + offs, (w * y).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(
    X, W, OUT, stride_xt, stride_xh, stride_ot, stride_oh, N, eps, BLOCK_N: tl.constexpr,
):
    # grid = (tokens, heads): one program normalises one row of N (hidden size, or head_dim for q/k norm).
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(X + t * stride_xt + h * stride_xh + offs, mask=mask, other=0.0).to(tl.float32)
    _normed_store(x, X, W, OUT, t * stride_ot + h * stride_oh, offs, mask, N, eps)


@triton.jit
def _add_rms_norm_kernel(X, RES, W, stride_x, stride_r, N, eps, BLOCK_N: tl.constexpr):
    # grid = (tokens,): r = x + residual rounded to the storage dtype (as torch's add) -> RES; norm(r) -> X.
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(X + t * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(RES + t * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
    r = (x + res).to(RES.dtype.element_ty)
    tl.store(RES + t * stride_r + offs, r, mask=mask)
    _normed_store(r.to(tl.float32), X, W, X, t * stride_x, offs, mask, N, eps)


def _check_norm(x: torch.Tensor, weight: torch.Tensor) -> int:
    _check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x is a 0-d tensor: RMSNorm needs at least one dim")
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n},) (the last dim of x)")
    _check_float("weight", weight)
    if n > MAX_NORM_DIM:
        raise ValueError(f"x.shape[-1]={n}: the fused RMSNorm handles rows of at most {MAX_NORM_DIM}")
    return n


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x [T, N] or [T, H, N]; `out` (default new) may be x itself (in place).

    Other ranks are flattened to [rows, N] (a copy if x cannot be viewed so) and need out=None.
    """
    n = _check_norm(x, weight)
    if x.dim() not in (2, 3) and out is None:
        return rms_norm(x.reshape(-1, n), weight, eps).view(x.shape)
    t, h, sxt, sxh = _rows_3d("x", x)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)  # what `weight * x.to(dtype)` gives in torch
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if out.shape != x.shape or out.dtype != out_dtype:
        raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, expected {tuple(x.shape)} {out_dtype}")
    _check_float("out", out)
    _, _, sot, soh = _rows_3d("out", out)
    if out.data_ptr() != x.data_ptr() and _overlap(out, x):
        raise ValueError("out overlaps x without being x: pass out=x for in place, or a separate tensor")
    if t * h == 0:
        return out
    block = next_pow2(n)
    _rms_norm_kernel[(t, h)](x, weight, out, sxt, sxh, sot, soh, n, float(eps), BLOCK_N=block, num_warps=_warps(block))
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) for x, residual [T, N], written in place into (x, residual)."""
    n = _check_norm(x, weight)
    _check_float("residual", residual)
    if x.dim() != 2 or residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} {residual.dtype}: expected the same "
            "[tokens, dim] shape and dtype"
        )
    if torch.promote_types(x.dtype, weight.dtype) != x.dtype:
        raise ValueError(f"weight.dtype={weight.dtype} would promote x.dtype={x.dtype}: the in-place norm needs x's dtype")
    if _overlap(x, residual):
        raise ValueError("x and residual overlap: the in-place add-norm needs two separate buffers")
    if x.shape[0]:
        block = next_pow2(n)
        _add_rms_norm_kernel[(x.shape[0],)](
            x, residual, weight, x.stride(0), residual.stride(0), n, float(eps), BLOCK_N=block, num_warps=_warps(block)
        )
    return x, residual


# --- RoPE ---------------------------------------------------------------------------------------------
@triton.jit
def _rotate_heads(X, OUT, t, stride_xt, stride_xh, stride_ot, stride_oh, num_heads, c1, c2, s1, s2,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """out = x * cos + rotate_half(x) * sin for one token's heads, rounding like torch's ops in x's dtype."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < num_heads)[:, None] & (offs_d < HALF)[None, :]
    src = X + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    dst = OUT + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    dt = OUT.dtype.element_ty
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) = [-x2, x1]; each product and the sum are rounded to the storage dtype as in torch
    o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(dst, o1.to(dt), mask=mask)
    tl.store(dst + HALF, o2.to(dt), mask=mask)


@triton.jit
def _rotary_qk_kernel(
    Q, K, QO, KO, COS, SIN,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh, stride_ct, stride_st,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # grid = (tokens,): one program rotates every q and k head of one token with that token's cos/sin row.
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    dmask = offs_d < HALF
    c1 = tl.load(COS + t * stride_ct + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + t * stride_ct + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + t * stride_st + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + t * stride_st + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q, QO, t, stride_qt, stride_qh, stride_qot, stride_qoh, num_q_heads, c1, c2, s1, s2,
                  HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K, KO, t, stride_kt, stride_kh, stride_kot, stride_koh, num_k_heads, c1, c2, s1, s2,
                  HALF, BLOCK_HK, BLOCK_HALF)


def rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q [T, H, D] and k [T, Hkv, D] with cos/sin [T, D] (RotaryEmbedding's output) in one launch.

    q_out/k_out default to new contiguous tensors; passing q/k themselves rotates in place.
    """
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _check_float(name, t)
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)}: expected [tokens, heads, head_dim] with equal tokens and head_dim"
        )
    num_tokens, num_q_heads, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotate_half RoPE")
    if cos.shape != (num_tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)}: expected ({num_tokens}, {head_dim})")
    if k.dtype != q.dtype or cos.dtype != q.dtype or sin.dtype != q.dtype:
        raise ValueError(f"q {q.dtype}, k {k.dtype}, cos {cos.dtype}, sin {sin.dtype} must share one dtype")
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format) if q_out is None else q_out
    k_out = torch.empty_like(k, memory_format=torch.contiguous_format) if k_out is None else k_out
    for name, out, src in (("q_out", q_out, q), ("k_out", k_out, k)):
        if out.shape != src.shape or out.dtype != src.dtype:
            raise ValueError(f"{name} is {tuple(out.shape)} {out.dtype}, expected {tuple(src.shape)} {src.dtype}")
        _check_float(name, out)
        if (out.data_ptr() != src.data_ptr() or out.stride() != src.stride()) and _overlap(out, src):
            raise ValueError(f"{name} overlaps its input without being it: pass the input itself for in place")
    if _overlap(q_out, k) or _overlap(k_out, q) or _overlap(q_out, k_out):
        raise ValueError("q_out/k_out overlap the other projection: q and k outputs must be separate")
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_half, block_hq, block_hk = next_pow2(half), next_pow2(num_q_heads), next_pow2(k.shape[1])
    _rotary_qk_kernel[(num_tokens,)](
        q, k, q_out, k_out, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0), sin.stride(0),
        num_q_heads, k.shape[1],
        HALF=half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        num_warps=_warps(max(block_hq, block_hk) * block_half), **ROTARY_COMPILE_OPTIONS,
    )
    return q_out, k_out


# --- SiLU and mul -------------------------------------------------------------------------------------
@triton.jit
def _silu_and_mul_kernel(GU, OUT, stride_gt, stride_ot, inter, BLOCK: tl.constexpr):
    # grid = (tokens, cdiv(inter, BLOCK)): out[t, j] = silu(gate[t, j]).to(dtype) * up[t, j].
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(GU + t * stride_gt + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + t * stride_gt + inter + offs, mask=mask, other=0.0).to(tl.float32)
    dt = OUT.dtype.element_ty
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # F.silu rounds to the storage dtype before the mul
    tl.store(OUT + t * stride_ot + offs, (s * u).to(dt), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2 * I] (gate first, as the fused projection stacks them) -> [..., I]."""
    _check_float("gate_up", gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up has shape {tuple(gate_up.shape)}: expected [..., 2 * intermediate]")
    if gate_up.dim() != 2:
        return silu_and_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        grid = (num_tokens, triton.cdiv(inter, SILU_BLOCK))
        _silu_and_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=SILU_BLOCK)
    return out
