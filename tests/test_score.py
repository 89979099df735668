"""ScoreSpec: the normalized score arguments every backend reads (tileattn/score.py)."""

import math

import pytest
import torch

from tileattn.score import FLAG_NAMES, LOG2E, WINDOW_CLAMP, ScoreSpec


def test_build_normalizes():
    """Default scale 1/sqrt(D), causal folded into the right edge, softcap inf = off, fp32 tensors."""
    slopes, sinks = torch.rand(4, dtype=torch.float16), torch.randn(4, dtype=torch.bfloat16)
    spec = ScoreSpec.build(64, causal=True, window=(7, 3), softcap=math.inf, alibi_slopes=slopes, sinks=sinks)
    assert spec.scale == 0.125 and spec.window == (7, 0) and spec.softcap == 0.0
    assert spec.alibi_slopes.dtype == torch.float32 and spec.sinks.dtype == torch.float32
    assert torch.equal(spec.alibi_slopes, slopes.float()) and spec.seed == 0
    assert ScoreSpec.build(64, scale=-2, window=(-1, 5)).window == (-1, 5)
    assert ScoreSpec.build(64, scale=-2).scale == -2.0


@pytest.mark.parametrize("field,value,flag", [
    ("window", (3, -1), "HAS_LEFT"), ("window", (-1, 0), "HAS_RIGHT"), ("softcap", 5.0, "SOFTCAP"),
    ("alibi_slopes", torch.rand(2, 4), "ALIBI"), ("sinks", torch.randn(4), "SINKS"),
    ("dropout_p", 0.1, "DROPOUT"), ("scale", -0.5, "NEG_SCALE")])
def test_each_feature_sets_its_flag_and_key(field, value, flag):
    """Each feature turns on exactly its constexpr, changes the plan key and names itself in features()."""
    plain = ScoreSpec(scale=0.5)
    spec = ScoreSpec(**{"scale": 0.5, field: value})
    on = {name for name, v in spec.constexprs().items() if v}
    assert on == {flag} and not any(plain.constexprs().values())
    assert spec.key() != plain.key() and tuple(spec.constexprs()) == FLAG_NAMES
    assert len(spec.features()) == (0 if flag == "NEG_SCALE" else 1) and plain.features() == ()


def test_mask_kind():
    assert ScoreSpec(scale=1.0).mask_kind == 0
    assert ScoreSpec(scale=1.0, attn_mask=torch.ones(2, 2, dtype=torch.bool)).mask_kind == 1
    spec = ScoreSpec(scale=1.0, attn_mask=torch.zeros(2, 2))
    assert spec.mask_kind == 2 and spec.constexprs()["MASK_KIND"] == 2 and spec.features() == ("float mask",)


def test_scalars_are_base2_and_clamped():
    spec = ScoreSpec(scale=0.25, window=(2**40, 2**31), softcap=8.0, dropout_p=0.2, seed=77)
    qk_scale, softcap_scale, softcap_log2, left, right, p, seed = spec.scalars()
    assert qk_scale == 0.25 * LOG2E and softcap_scale == 0.25 / 8.0 and softcap_log2 == 8.0 * LOG2E
    assert (left, right) == (WINDOW_CLAMP, WINDOW_CLAMP) and p == 0.2 and seed == 77
    assert ScoreSpec(scale=1.0, seed=77).scalars()[-1] == 0  # no dropout: no seed
    assert ScoreSpec(scale=1.0).scalars()[1] == 0.0  # no softcap: no division


def test_op_fields_round_trip_and_expand():
    """The ops carry the spec's fields through the dispatcher and rebuild it in full-shape form."""
    slopes, mask = torch.rand(4), torch.randn(1, 4, 1, 9)
    spec = ScoreSpec.build(16, causal=True, softcap=3.0, alibi_slopes=slopes, attn_mask=mask, dropout_p=0.3)
    again = ScoreSpec.from_op_fields(*spec.op_fields(), seed=torch.tensor(5))
    assert again.op_fields()[:4] == spec.op_fields()[:4] and again.seed == 5 and again.key() == spec.key()
    full = again.expanded(2, 4, 6, 9)
    assert full.alibi_slopes.shape == (2, 4) and full.alibi_slopes.stride() == (0, 1)
    assert full.attn_mask.shape == (2, 4, 6, 9) and full.attn_mask.stride()[0] == 0
    assert ScoreSpec(scale=1.0).expanded(2, 4, 6, 9).alibi_slopes is None
    assert ScoreSpec.from_op_fields(*ScoreSpec(scale=1.0).op_fields(), seed=torch.tensor(5)).seed == 0
