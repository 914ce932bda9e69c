"""export-tosa of the authors' code variants (issue 19): the emitters against refvit's kernels through the TOSA
reading (tests/tosa_reference.py), and which named schemes export."""
from __future__ import annotations

import numpy as np
import pytest

from refvit import export_tosa as E
from refvit import graph as G
from refvit import int_kernels_authors as KA
from refvit import int_kernels_variants as KV
from refvit.config import DeiTConfig
from refvit.intmath import DOUBLE_ROUND, SINGLE_ROUND
from test_tosa import constants, record, run_emitter, score_rows


@pytest.mark.parametrize("sigma", [1e-5, 3e-4, 0.004, 0.03, 0.5])
def test_softmax_poly_ibert_code_matches_kernel(sigma):
    D = 64
    scores = score_rows(D, 37, np.random.default_rng(int(sigma * 1e6)))
    m, s = KV.softmax_exp_multiplier(sigma)
    c = constants(multiplier=np.int32(m), shift=np.int8(s))
    for rounding in (SINGLE_ROUND, DOUBLE_ROUND):
        got = run_emitter(E._softmax_poly_ibert_code, record("softmax", "poly-ibert-code", rounding=rounding),
                          {"s": scores}, c, {"head_dim": D})
        assert np.array_equal(got, KA.softmax_poly_ibert_code(scores, m, s, rounding=rounding)), (sigma, rounding)


@pytest.mark.parametrize("scale_in,scale_out", [(0.005, 0.004), (0.02, 0.02), (0.3, 0.1)])
def test_gelu_poly_ibert_code_exports_with_the_poly_emitter(scale_in, scale_out):
    x = np.arange(-128, 128, dtype=np.int8).reshape(1, 1, 16, 16)
    consts = KA.gelu_poly_ibert_code_constants(scale_in, scale_out)
    c = constants(**{k: np.int64(v) for k, v in consts.items()})
    for rounding in (SINGLE_ROUND, DOUBLE_ROUND):
        got = run_emitter(E._gelu_poly, record("gelu", "poly-ibert-code", rounding=rounding), {"x": x}, c)
        assert np.array_equal(got, KA.gelu_poly_ibert_code(x, **consts, rounding=rounding))


def test_which_authors_variants_export():
    cfg = DeiTConfig(img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2, num_classes=3)
    code = G.Scheme("ibert-code-tosa", layernorm="int32", softmax="poly-ibert-code", gelu="poly-ibert-code")
    E.check_exportable(G.build_graph(cfg, SINGLE_ROUND, code), code.name)      # every op has an emitter
    for name, op in (("ibert", "blocks.0.norm1"), ("ivit", "blocks.0.norm1")):
        with pytest.raises(E.TosaExportError, match=f"op '{op}'"):
            E.check_exportable(G.build_graph(cfg, SINGLE_ROUND, G.SCHEMES[name]), name)
    shift16 = G.Scheme("s16", layernorm="int32", softmax="shift16")
    with pytest.raises(E.TosaExportError, match="op 'blocks.0.attn.softmax'"):
        E.check_exportable(G.build_graph(cfg, SINGLE_ROUND, shift16), shift16.name)
