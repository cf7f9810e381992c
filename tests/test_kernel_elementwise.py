"""Fused elementwise kernels (kernels/elementwise.py) against float64 references and the models' torch code.

The float64 references round to the storage dtype at the same points as the torch code (that is the
semantics the kernels promise), so a kernel may differ from them by at most one final rounding.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: run the kernels on CPU tensors

import pytest
import torch

from sparse_llm.kernels import elementwise as ew
from sparse_llm.models import layers
from sparse_llm.models.layers import RMSNorm
from sparse_llm.models.rotary import apply_rotary

DTYPES = [torch.float32, torch.float16]
EPS = 1e-5
# RMSNorm: in float16 the float32 arithmetic inside is exact enough that only the roundings count (the one
# before the weight may fall the other way: 1 ulp, plus the final 0.5); in float32 the reduction and rsqrt
# errors themselves are a few ulps.
NORM_ULPS = {torch.float32: 8, torch.float16: 1.5}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of dtype at |x| (plus the smallest normal, for values near 0)."""
    info = torch.finfo(dtype)
    return x.abs().double() * info.eps + info.tiny


def assert_within_ulps(got: torch.Tensor, ref64: torch.Tensor, ulps: float = 1.0):
    err = (got.double() - ref64).abs()
    bound = ulps * ulp(ref64, got.dtype)
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, worst excess {(err - bound).max().item():.3g}"


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 RMSNorm, rounded to x's dtype before the weight (HF LlamaRMSNorm); the last rounding is left out."""
    x64 = x.double()
    y = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).double()
    return w.double() * y


def rand(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# --- RMSNorm ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("dim", [64, 96, 200])
def test_rms_norm_matches_float64_and_the_torch_module(dtype, tokens, dim):
    g = torch.Generator().manual_seed(tokens * 1000 + dim)
    x, w = rand((tokens, dim), dtype, g, 3.0), rand((dim,), dtype, g) + 1
    out = ew.rms_norm(x, w, EPS)
    assert out.dtype == dtype and out.shape == x.shape
    # the normalised value's rounding (before w) may fall the other way: |w| x one ulp of it = one ulp of the
    # result, plus the final rounding
    assert_within_ulps(out, rms_norm_ref(x, w, EPS), ulps=NORM_ULPS[dtype])
    module = RMSNorm(dim, EPS)
    module.weight.data = w
    torch_out = module(x)  # CPU torch path (FUSED_KERNELS default: off on CPU)
    assert_within_ulps(out, torch_out.double(), ulps=2 * NORM_ULPS[dtype])
    if dtype == torch.float16:  # same rounding points: mostly bit-identical (float32 differs in rstd's last bit)
        assert (out == torch_out).float().mean() > 0.9


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_dim", [(3, 16), (5, 24)])
def test_rms_norm_per_head_on_a_strided_view_in_place(dtype, heads, head_dim):
    """Qwen3's q/k norm: rows of head_dim inside a fused qkv output (row stride > heads * head_dim)."""
    g = torch.Generator().manual_seed(heads)
    tokens = 7
    qkv = rand((tokens, heads * head_dim + 40), dtype, g, 2.0)
    q = qkv[:, 8:8 + heads * head_dim].view(tokens, heads, head_dim)
    w = rand((head_dim,), dtype, g) + 1
    ref = rms_norm_ref(q, w, EPS)
    untouched = qkv.clone()
    out = ew.rms_norm(q, w, EPS, out=q)
    assert out is q
    assert_within_ulps(q, ref, ulps=NORM_ULPS[dtype])
    end = 8 + heads * head_dim
    assert torch.equal(qkv[:, :8], untouched[:, :8]) and torch.equal(qkv[:, end:], untouched[:, end:])


def test_rms_norm_with_a_float32_weight_rounds_to_x_dtype_before_it():
    """torch promotes `weight * x32.to(x.dtype)` to float32: the rounding to x's dtype must stay."""
    g = torch.Generator().manual_seed(4)
    x, w = rand((7, 96), torch.float16, g, 3.0), rand((96,), torch.float32, g) + 1
    module = RMSNorm(96, EPS)
    module.weight.data = w
    out, ref = ew.rms_norm(x, w, EPS), module(x)
    assert out.dtype == ref.dtype == torch.float32
    # where y's float16 rounding falls the other way: |w| x one float16 ulp of y = one float16 ulp of the result
    err = (out.double() - ref.double()).abs()
    assert bool((err <= ulp(ref, torch.float16) + 4 * ulp(ref, torch.float32)).all())
    assert (out == ref).float().mean() > 0.9


def test_rms_norm_flattens_other_ranks():
    g = torch.Generator().manual_seed(3)
    dtype = torch.float32
    x, w = rand((2, 3, 4, 40), dtype, g), rand((40,), dtype, g)
    out = ew.rms_norm(x, w, EPS)
    assert out.shape == x.shape
    assert_within_ulps(out, rms_norm_ref(x, w, EPS), ulps=NORM_ULPS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,dim", [(1, 64), (7, 96), (33, 136)])
def test_fused_add_rms_norm_writes_both_results_in_place(dtype, tokens, dim):
    g = torch.Generator().manual_seed(tokens + dim)
    # x and residual as two separate views of one buffer with a row stride: aliasing of storage, not of elements
    buf = rand((tokens, 2 * dim + 5), dtype, g, 2.0)
    x, residual = buf[:, :dim], buf[:, dim + 5:]
    w = rand((dim,), dtype, g) + 1
    gap = buf[:, dim:dim + 5].clone()
    summed = x + residual  # torch's add in dtype: the residual stream the kernel must reproduce bit for bit
    ref = rms_norm_ref(summed, w, EPS)
    module = RMSNorm(dim, EPS)
    module.weight.data = w
    torch_normed, torch_residual = module(x.clone(), residual.clone())
    normed, new_residual = ew.fused_add_rms_norm(x, residual, w, EPS)
    assert normed.data_ptr() == x.data_ptr() and new_residual.data_ptr() == residual.data_ptr()
    assert torch.equal(new_residual, summed) and torch.equal(torch_residual, summed)
    assert_within_ulps(normed, ref, ulps=NORM_ULPS[dtype])
    assert_within_ulps(normed, torch_normed.double(), ulps=2 * NORM_ULPS[dtype])
    assert torch.equal(buf[:, dim:dim + 5], gap)  # nothing written between the two views


def test_fused_add_rms_norm_refuses_overlapping_buffers():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="x and residual overlap"):
        ew.fused_add_rms_norm(x, x, torch.ones(32), EPS)
    with pytest.raises(ValueError, match="x and residual overlap"):
        buf = torch.randn(4, 48)
        ew.fused_add_rms_norm(buf[:, :32], buf[:, 16:], torch.ones(32), EPS)


def test_norm_bad_input_names_the_field():
    with pytest.raises(ValueError, match=r"weight has shape \(31,\), expected \(32,\)"):
        ew.rms_norm(torch.randn(3, 32), torch.ones(31), EPS)
    with pytest.raises(ValueError, match=r"x.dtype=torch.float64"):
        ew.rms_norm(torch.randn(3, 32, dtype=torch.float64), torch.ones(32), EPS)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        ew.rms_norm(torch.randn(32, 3).t(), torch.ones(32), EPS)
    with pytest.raises(ValueError, match=r"residual .* expected the same"):
        ew.fused_add_rms_norm(torch.randn(3, 32), torch.randn(4, 32), torch.ones(32), EPS)
    with pytest.raises(ValueError, match="would promote"):
        ew.fused_add_rms_norm(torch.randn(3, 32).half(), torch.randn(3, 32).half(), torch.ones(32), EPS)


# --- RoPE ---------------------------------------------------------------------------------------------
def cos_sin(tokens: int, head_dim: int, dtype, g):
    """Rows as RotaryEmbedding builds them: cat(freqs, freqs) at random positions (up to 40K)."""
    pos = torch.randint(0, 40000, (tokens,), generator=g).double()
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = pos[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """float64 x*cos + rotate_half(x)*sin with each product rounded to x's dtype (torch's op by op rounding)."""
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = cos.double()[:, None, :], sin.double()[:, None, :]
    half = x.shape[-1] // 2
    p1 = (torch.cat((x1, x2), -1) * c).to(x.dtype).double()
    p2 = (torch.cat((-x2, x1), -1) * s).to(x.dtype).double()
    assert p1.shape[-1] == 2 * half
    return p1 + p2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (6, 2, 96), (8, 1, 12)])
@pytest.mark.parametrize("in_place", [False, True])
def test_rotary_qk_matches_float64_and_apply_rotary(dtype, tokens, heads, kv_heads, head_dim, in_place):
    g = torch.Generator().manual_seed(tokens * 100 + heads * 10 + head_dim)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = rand((tokens, q_size + 2 * kv_size), dtype, g, 2.0)  # q and k are views of a fused projection output
    q = qkv[:, :q_size].view(tokens, heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, q_size + kv_size:].clone()
    cos, sin = cos_sin(tokens, head_dim, dtype, g)
    q_ref, k_ref = rotary_ref(q, cos, sin), rotary_ref(k, cos, sin)
    q_torch, k_torch = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    q_out, k_out = ew.rotary_qk(q, k, cos, sin, *((q, k) if in_place else ()))
    if in_place:
        assert q_out is q and k_out is k
    else:
        assert q_out.is_contiguous() and k_out.is_contiguous()
    assert_within_ulps(q_out, q_ref, 0.5)  # only the final rounding of the sum
    assert_within_ulps(k_out, k_ref, 0.5)
    assert torch.equal(q_out, q_torch) and torch.equal(k_out, k_torch)  # same rounding points as the torch code
    assert torch.equal(qkv[:, q_size + kv_size:], v_before)


def test_rotary_bad_input_names_the_field():
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    cos = torch.randn(3, 16)
    with pytest.raises(ValueError, match=r"cos \(3, 8\) / sin \(3, 16\): expected \(3, 16\)"):
        ew.rotary_qk(q, k, cos[:, :8], cos, None, None)
    with pytest.raises(ValueError, match="head_dim=15 must be even"):
        ew.rotary_qk(torch.randn(3, 4, 15), torch.randn(3, 2, 15), torch.randn(3, 15), torch.randn(3, 15))
    with pytest.raises(ValueError, match="must share one dtype"):
        ew.rotary_qk(q, k.half(), cos, cos)
    with pytest.raises(ValueError, match="q_out overlaps its input"):
        buf = torch.randn(3, 5, 16)
        ew.rotary_qk(buf[:, :4], k, cos, cos, q_out=buf[:, 1:])


# --- SiLU and mul -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("inter", [64, 96, 1100])  # 1100: two programs per row, the second one masked
def test_silu_and_mul_matches_float64_on_a_strided_input(dtype, tokens, inter):
    g = torch.Generator().manual_seed(tokens + inter)
    wide = rand((tokens, 2 * inter + 24), dtype, g, 3.0)
    gate_up = wide[:, 24:]  # row stride 2 * inter + 24
    out = ew.silu_and_mul(gate_up)
    assert out.shape == (tokens, inter) and out.dtype == dtype
    gate, up = gate_up.double().chunk(2, dim=-1)
    silu = torch.nn.functional.silu(gate).to(dtype).double()  # F.silu rounds before the mul
    # silu's own float32 error (exp, add, divide: a few float32 ulps; in float16 its rounding may fall the other
    # way: one ulp), carried through |up|, plus the final rounding
    silu_ulps = 4 if dtype == torch.float32 else 1
    ref = silu * up
    bound = ulp(ref, dtype) + silu_ulps * ulp(silu, dtype) * up.abs()
    assert bool(((out.double() - ref).abs() <= bound).all())
    torch_out = layers.silu_and_mul(gate_up)  # the CPU torch path
    assert bool(((out.double() - torch_out.double()).abs() <= 2 * bound).all())
    if dtype == torch.float16:  # same rounding points: mostly bit-identical (float32 differs in exp's last bits)
        assert (out == torch_out).float().mean() > 0.9


def test_silu_and_mul_keeps_leading_dims_and_refuses_odd_width():
    x = torch.randn(2, 3, 20)
    ref = torch.nn.functional.silu(x[..., :10]) * x[..., 10:]
    assert torch.allclose(ew.silu_and_mul(x), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"gate_up has shape \(3, 21\)"):
        ew.silu_and_mul(torch.randn(3, 21))


# --- whole models -------------------------------------------------------------------------------------
def unfused_model_forward(model):
    """LlamaModel.forward as it was before the add+norm restructuring: the bit-for-bit oracle of the CPU path."""

    def forward(input_ids, positions):
        hidden = model.embed_tokens(input_ids)
        cos, sin = model.rotary_emb(positions, hidden.dtype)
        for layer in model.layers:
            hidden = hidden + layer.self_attn(layer.input_layernorm(hidden), cos, sin)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return model.norm(hidden)

    return forward


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_models_with_fused_kernels_match_the_torch_path(tmp_path, monkeypatch, architecture):
    from sparse_llm.models.loader import load_model
    from sparse_llm.models.testing import save_tiny_checkpoint, single_prefill_logits

    save_tiny_checkpoint(str(tmp_path), architecture, seed=2)
    loaded = load_model(str(tmp_path), dtype="float32")
    ids = torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(5)).tolist()
    torch_logits = single_prefill_logits(loaded, ids, block_size=8)
    inner = loaded.model.model
    with monkeypatch.context() as m:
        m.setattr(inner, "forward", unfused_model_forward(inner))
        assert torch.equal(single_prefill_logits(loaded, ids, block_size=8), torch_logits)  # CPU path unchanged

    calls = {name: 0 for name in ("rms_norm", "fused_add_rms_norm", "rotary_qk", "silu_and_mul")}
    for name in calls:
        def counted(*args, _name=name, _fn=getattr(ew, name), **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(ew, name, counted)
    monkeypatch.setattr(layers, "FUSED_KERNELS", True)
    fused_logits = single_prefill_logits(loaded, ids, block_size=8)
    num_layers, qk_norm = len(inner.layers), architecture == "Qwen3ForCausalLM"
    # first layer's input norm alone (+ q and k norms per layer); every later norm takes the residual add
    assert calls == {"rms_norm": 1 + 2 * num_layers * qk_norm, "fused_add_rms_norm": 2 * num_layers,
                     "rotary_qk": num_layers, "silu_and_mul": num_layers}
    assert torch_logits.abs().max() > 1.0
    assert (fused_logits - torch_logits).abs().max().item() < 1e-4


# --- the GPU build --------------------------------------------------------------------------------------
SM90_COMPILE = r"""
import collections, json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparse_llm.kernels import elementwise as ew

p, ops = "*bf16", {}
def ptx(fn, sig, consts, **options):
    sig.update({name: "constexpr" for name in consts})
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=options)
    return collections.Counter(re.findall(r"^\s*((?:fma|mul|add)\.[a-z0-9.]+)", k.asm["ptx"], re.M))
ops["rms_norm"] = ptx(ew._rms_norm_kernel, dict(X=p, W=p, OUT=p, stride_xt="i32", stride_xh="i32", stride_ot="i32",
                      stride_oh="i32", N="i32", eps="fp32"), dict(BLOCK_N=4096), num_warps=8)
ops["add_rms_norm"] = ptx(ew._add_rms_norm_kernel, dict(X=p, RES=p, W=p, stride_x="i32", stride_r="i32", N="i32",
                          eps="fp32"), dict(BLOCK_N=4096), num_warps=8)
sig = {n: p for n in ("Q", "K", "QO", "KO", "COS", "SIN")}
sig.update({n: "i32" for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_qot", "stride_qoh",
                               "stride_kot", "stride_koh", "stride_ct", "stride_st", "num_q_heads", "num_k_heads")})
ops["rotary_qk"] = ptx(ew._rotary_qk_kernel, sig, dict(HALF=64, BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=64),
                       **ew.ROTARY_COMPILE_OPTIONS)  # what rotary_qk launches with
ops["silu_and_mul"] = ptx(ew._silu_and_mul_kernel, dict(GU=p, OUT=p, stride_gt="i32", stride_ot="i32", inter="i32"),
                          dict(BLOCK=1024))
print(json.dumps(ops))
"""


def test_kernels_compile_for_h100_and_rope_keeps_torch_rounding():
    """The interpreter does not run Triton's GPU compiler: build bf16 PTX + cubin for sm_90 (no GPU needed), and
    check that RoPE's products stay rounded (mul.rn.bf16, add.rn.bf16), not fused into an FMA that skips it."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SM90_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ops = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(ops) == {"rms_norm", "add_rms_norm", "rotary_qk", "silu_and_mul"}
    rope = ops["rotary_qk"]
    assert not any(op.startswith("fma") for op in rope), rope
    assert rope.get("mul.rn.bf16", 0) > 0 and rope.get("add.rn.bf16", 0) > 0, rope
