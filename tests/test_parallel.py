"""refvit.parallel: the thread knob, the block splitting, and the same bits at 1, 2 and 3 threads.

Every threaded pass is run with blocks made small (parallel.MIN_BLOCK lowered) so that even these small
arrays are cut into one block per thread, and compared bit for bit with the one-thread result; the integer
kernels are also compared with the normative reference kernels (refvit.reference), an independent
computation, and whole models (several schemes, both roundings) are compared across thread counts and
against per-image runs (batch-size independence)."""
from __future__ import annotations

import numpy as np
import pytest

from refvit import functional as F
from refvit import int_kernels as K
from refvit import int_model, intmath, model_conv, model_token, parallel
from refvit.graph import SCHEMES
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND
from refvit.reference import arith as RA
from refvit.reference import kernels as RK

THREADS = (1, 2, 3)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of at least 64 elements (instead of parallel.MIN_BLOCK): small test arrays split per thread;
    the thread count is restored afterwards."""
    monkeypatch.setattr(parallel, "MIN_BLOCK", 64)
    before = parallel.threads()
    yield
    parallel.set_threads(before, blas=False)


def at_threads(fn, *args, **kwargs) -> dict:
    """{n: fn(*args, **kwargs) run with n pool threads} for n in THREADS (BLAS untouched)."""
    out = {}
    for n in THREADS:
        parallel.set_threads(n, blas=False)
        out[n] = fn(*args, **kwargs)
    return out


def assert_same_bits(results: dict) -> None:
    """Every thread count's result equals the one-thread result bit for bit (arrays or tuples / dicts of them)."""
    def flat(r):
        if isinstance(r, dict):
            return [v for k in sorted(r) for v in flat(r[k])]
        if isinstance(r, (tuple, list)):
            return [v for x in r for v in flat(x)]
        return [np.asarray(r)]
    one = flat(results[1])
    for n, r in results.items():
        got = flat(r)
        assert len(got) == len(one)
        for a, b in zip(one, got):
            assert a.dtype == b.dtype and a.shape == b.shape, n
            assert a.tobytes() == b.tobytes(), f"{n} threads differ"   # bit for bit (NaN, -0.0 included)


# ---------------------------------------------------------------- the knob and the splitting

def test_threads_from_environment(monkeypatch):
    monkeypatch.setenv("REFVIT_THREADS", "3")
    assert parallel.default_threads() == 3
    monkeypatch.setenv("REFVIT_THREADS", "0")                 # not a positive count: the BLAS count decides
    monkeypatch.delenv("REFVIT_THREADS")
    blas = parallel.blas_threads()
    assert parallel.default_threads() == (blas if blas else parallel.default_threads())
    assert parallel.default_threads() >= 1


def test_set_threads_rejects_non_positive(small_blocks):
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="positive integer"):
            parallel.set_threads(bad, blas=False)
    parallel.set_threads(2, blas=False)
    assert parallel.threads() == 2


def test_run_calls_every_item_once_and_propagates_errors(small_blocks):
    parallel.set_threads(3, blas=False)
    seen = np.zeros(50, int)
    parallel.run(lambda i: seen.__setitem__(i, seen[i] + 1), range(50))
    assert (seen == 1).all()
    with pytest.raises(ZeroDivisionError):
        parallel.run(lambda i: 1 // (i - 7), range(10))


@pytest.mark.parametrize("n", THREADS)
def test_run_uses_at_most_n_threads_the_caller_included(small_blocks, n):
    import threading
    import time
    parallel.set_threads(n, blas=False)
    who = []
    parallel.run(lambda i: (who.append(threading.get_ident()), time.sleep(0.002)), range(12))
    assert len(who) == 12 and threading.get_ident() in who and len(set(who)) <= n


def test_nested_runs_are_serial_in_a_worker(small_blocks):
    parallel.set_threads(2, blas=False)
    inner = []

    def outer(i):
        parallel.run(lambda j: inner.append((i, j)), range(4))   # runs in whichever thread, no deadlock
    parallel.run(outer, range(4))
    assert sorted(inner) == [(i, j) for i in range(4) for j in range(4)]


@pytest.mark.parametrize("n", THREADS + (4,))
@pytest.mark.parametrize("shape", [(197,), (3, 384, 1, 197), (2, 5, 7), (1, 1, 1), (0, 4), (), (7, 1)])
def test_blocks_tile_every_element_once(small_blocks, n, shape):
    parallel.set_threads(n, blas=False)
    count = np.zeros(shape, int)
    blocks = intmath._blocks(shape, 1 << 10)
    for idx in blocks:
        count[idx] += 1
    assert (count == 1).all()
    if n > 1 and int(np.prod(shape)) >= n * 64 and len(shape) and shape[-1] > 1:
        assert len(blocks) >= n                                     # a block per thread at least


@pytest.mark.parametrize("n", THREADS)
@pytest.mark.parametrize("count,each", [(197, 384), (1, 10), (10, 1), (1000, 1), (5, 100000)])
def test_ranges_are_near_equal_and_cover(small_blocks, n, count, each):
    parallel.set_threads(n, blas=False)
    r = parallel.ranges(count, each, 1 << 12)
    assert r[0][0] == 0 and r[-1][1] == count and all(a[1] == b[0] for a, b in zip(r, r[1:]))
    sizes = [b - a for a, b in r]
    assert max(sizes) - min(sizes) <= max(sizes) // 2 + 1 and min(sizes) >= 1


# ---------------------------------------------------------------- integer kernels

RNG = np.random.default_rng(22)


def int8(shape, lo=-128, hi=127):
    return RNG.integers(lo, hi + 1, shape).astype(np.int8)


@pytest.mark.parametrize("rounding", [SINGLE_ROUND, DOUBLE_ROUND])
@pytest.mark.parametrize("shift,out_dtype", [(38, np.int8), (38, np.int16), (20, np.int8), (40, np.int64)])
def test_requantize_same_bits_and_reference(small_blocks, rounding, shift, out_dtype):
    acc = RNG.integers(-(1 << 19), 1 << 19, (2, 48, 1, 50)).astype(np.int32)
    m = RNG.integers(1 << 30, 1 << 31, (1, 48, 1, 1))
    s = np.full((1, 48, 1, 1), shift)
    if out_dtype is np.int64:
        res = at_threads(intmath.apply_scale, acc, m, s, rounding)
        want = RA.apply_scale(acc, m, s, rounding)
    else:
        res = at_threads(intmath.requantize, acc, m, s, out_dtype, rounding)
        want = RA.requantize(acc, m, s, out_dtype, rounding)
    assert_same_bits(res)
    assert np.array_equal(res[3], np.asarray(want))


@pytest.mark.parametrize("rounding", [SINGLE_ROUND, DOUBLE_ROUND])
def test_conv2d_same_bits_and_reference(small_blocks, rounding):
    x, w = int8((2, 12, 16, 16)), int8((40, 12, 4, 4), -127, 127)
    bias = RNG.integers(-5000, 5000, 40).astype(np.int32)
    m, s = RNG.integers(1 << 30, 1 << 31, 40), RNG.integers(34, 42, 40)
    res = at_threads(K.conv2d, x, w, bias, m, s, rounding=rounding)
    assert_same_bits(res)
    assert np.array_equal(res[2], RK.conv2d(x, w, bias, m, s, rounding=rounding))


@pytest.mark.parametrize("rounding", [SINGLE_ROUND, DOUBLE_ROUND])
@pytest.mark.parametrize("internals", [False, True])
def test_softmax_and_attention_same_bits_and_reference(small_blocks, rounding, internals):
    q, k, v = int8((2, 3, 16, 40)), int8((2, 3, 16, 40)), int8((2, 3, 16, 40))
    table = K.make_exp_table()
    scores = at_threads(K.attention_scores, q, k)
    assert_same_bits(scores)
    assert np.array_equal(scores[1], np.einsum("bhdi,bhdj->bhij", q.astype(np.int64), k.astype(np.int64)))

    def softmax():
        kept = {} if internals else None
        return K.softmax(scores[1], 1 << 30, 36, table, rounding=rounding, internals=kept), kept
    res = at_threads(softmax)
    assert_same_bits({n: (p, kept or {}) for n, (p, kept) in res.items()})
    p = res[2][0]
    assert np.array_equal(p, RK.softmax(scores[1], 1 << 30, 36, table, rounding=rounding))
    ctx = at_threads(K.attention_context, p, v, 1 << 30, 40, rounding=rounding)
    assert_same_bits(ctx)
    assert np.array_equal(ctx[3], RK.attention_context(p, v, 1 << 30, 40, rounding=rounding))


@pytest.mark.parametrize("b_shape", [(2, 24, 1, 30), (1, 24, 1, 1)])
def test_add_and_gelu_same_bits_and_reference(small_blocks, b_shape):
    a, b = int8((2, 24, 1, 30)), int8(b_shape)
    res = at_threads(K.add, a, b, 1 << 29, 3 << 28, 31)
    assert_same_bits(res)
    assert np.array_equal(res[3], RK.add(a, b, 1 << 29, 3 << 28, 31))
    table = int8((256,))
    g = at_threads(K.gelu, a, table)
    assert_same_bits(g)
    assert np.array_equal(g[2], table[a.astype(np.int64) + 128])


@pytest.mark.parametrize("rounding", [SINGLE_ROUND, DOUBLE_ROUND])
@pytest.mark.parametrize("shift", [26, 40])
def test_layernorm_same_bits_and_reference(small_blocks, rounding, shift):
    x = int8((3, 48, 1, 29))
    gamma, bias = int8((48,), -127, 127), RNG.integers(-1000, 1000, 48).astype(np.int32)
    m, s = RNG.integers(1 << 30, 1 << 31, 48), np.full(48, shift)
    res = at_threads(K.layernorm, x, 1000, gamma, bias, m, s, rounding=rounding)
    assert_same_bits(res)
    assert np.array_equal(res[2], RK.layernorm(x, 1000, gamma, bias, m, s, rounding=rounding))
    t = at_threads(K.layernorm_normalize, x, 1000)
    assert_same_bits(t)
    assert np.array_equal(t[3], RK.layernorm_normalize(x, 1000))


# ---------------------------------------------------------------- float passes

def test_float_gelu_layernorm_attention_same_bits(small_blocks):
    x = RNG.standard_normal((2, 50, 96)).astype(np.float32) * 3
    assert_same_bits(at_threads(F.gelu, x))
    assert_same_bits(at_threads(F.gelu, x.transpose(0, 2, 1)))          # a transposed view (the conv form's)
    w, b = RNG.standard_normal(96).astype(np.float32), RNG.standard_normal(96).astype(np.float32)
    ln = at_threads(F.layer_norm, x, w, b, 1e-6)
    assert_same_bits(ln)
    mean = x.astype(np.float64).mean(-1, keepdims=True)                 # independent float64 LayerNorm
    want = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6) * w + b
    assert np.allclose(ln[2], want, rtol=1e-5, atol=1e-5)
    xc = model_conv.channels_last(2, 96, 50, np.float32)
    xc[...] = x.transpose(0, 2, 1)[:, :, None, :]
    lc = at_threads(model_conv.layer_norm_conv, xc, w.reshape(96, 1, 1, 1), b, 1e-6)
    assert_same_bits(lc)
    assert np.allclose(lc[3][:, :, 0, :].transpose(0, 2, 1), want, rtol=1e-5, atol=1e-5)
    q, kt, v = (RNG.standard_normal(s).astype(np.float32) for s in ((2, 3, 40, 16), (2, 3, 16, 40), (2, 3, 40, 16)))

    def attend():
        out = np.empty((2, 3, 40, 16), np.float32)
        return out, F.attend(q, kt, v, out, probs=True)
    res = at_threads(attend)
    assert_same_bits(res)
    s = q.astype(np.float64) @ kt
    e = np.exp(s - s.max(-1, keepdims=True))
    assert np.allclose(res[2][0], (e / e.sum(-1, keepdims=True)) @ v, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- whole models

@pytest.mark.parametrize("scheme", ["refvit-int8", "ibert", "ivit", "int16-residual"])
@pytest.mark.parametrize("rounding", [SINGLE_ROUND, DOUBLE_ROUND])
def test_integer_model_same_bits_and_batch_independent(small_blocks, make_tiny, scheme, rounding):
    t = make_tiny(scheme=SCHEMES[scheme], rounding=rounding, method="max")
    xq = t.xq(4)
    res = at_threads(int_model.forward_int, t.qm, xq)
    assert_same_bits(res)
    parallel.set_threads(2, blas=False)
    one_by_one = np.concatenate([int_model.forward_int(t.qm, xq[i:i + 1]) for i in range(4)])
    assert np.array_equal(res[1], one_by_one)


def test_float_forms_same_bits(small_blocks, tiny):
    x = tiny.x[:3]
    tp = model_token.cast_params(tiny.params)
    assert_same_bits(at_threads(model_token.forward, tp, x, tiny.config))
    assert_same_bits(at_threads(model_conv.forward, tiny.conv, x, tiny.config))


def one_call_layer_norm(x, w, b, eps):
    """LayerNorm as one GEMV call per mean over x's own shape (the unsplit form, before refvit.parallel)."""
    u = np.full(x.shape[-1], 1.0 / x.shape[-1], x.dtype)
    d = x - (x @ u)[..., None]
    var = np.square(d) @ u
    d *= np.reciprocal(np.sqrt(var + np.asarray(eps, x.dtype)))[..., None]
    d *= w
    d += b
    return d


@pytest.mark.parametrize("b,n,c", [(3, 197, 64), (2, 5, 96), (1, 1, 32), (2, 3, 48), (4, 18, 48), (1, 9, 200)])
def test_layer_norm_blocks_keep_the_bits_of_one_gemv_call(small_blocks, b, n, c):
    x = (RNG.standard_normal((b, n, c)) * 3 + 1).astype(np.float32)
    w, bias = RNG.standard_normal(c).astype(np.float32), RNG.standard_normal(c).astype(np.float32)
    want = one_call_layer_norm(x, w, bias, 1e-6)                          # per image, as numpy stacks it
    for got in at_threads(F.layer_norm, x, w, bias, 1e-6).values():
        assert got.tobytes() == want.tobytes()
    want2 = one_call_layer_norm(x.reshape(-1, c), w, bias, 1e-6)         # the conv form: one call over B*N rows
    xc = model_conv.channels_last(b, c, n, np.float32)
    xc[...] = x.transpose(0, 2, 1)[:, :, None, :]
    for got in at_threads(model_conv.layer_norm_conv, xc, w.reshape(c, 1, 1, 1), bias, 1e-6).values():
        assert got[:, :, 0, :].transpose(0, 2, 1).reshape(-1, c).tobytes() == want2.tobytes()
