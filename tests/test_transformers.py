"""attn_implementation="tileattn" in transformers: tiny random-weight models (no download).

Each model (Llama: GQA; Mistral: sliding window; Gemma 2: softcap + sliding window; gpt-oss:
sinks + sliding window + MoE) is 2 layers of hidden 64, with a window of 8 so the prompts
exceed it. Logits are judged by RELIABILITY.md's rule: ``ref_hi`` the "eager" model in
float64 run on each prompt alone, unpadded (RoPE and windows are relative, so its logits are
the padded rows'; eager float64 itself turns fully masked pad rows into NaN), ``ref_lo`` the
same per-prompt runs in fp32 with transformers' own kernel ("sdpa", or "eager" where sdpa
lacks the feature), an fp32-level yardstick (``fp32_plain``). Pad rows are left out (their
output is unused; tileattn gives 0 where torch gives a softmax of all -inf).
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import tileattn.integrations.transformers as tt  # noqa: E402

from helpers import assert_close  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)  # peaked attention


def _config(name):
    if name == "llama":
        return transformers.LlamaConfig(**COMMON), "sdpa"
    if name == "mistral":
        return transformers.MistralConfig(**COMMON, sliding_window=8), "sdpa"
    if name == "gemma2":
        return transformers.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                         attn_logit_softcapping=2.0, final_logit_softcapping=30.0), "eager"
    return transformers.GptOssConfig(**COMMON, head_dim=16, sliding_window=8, num_local_experts=4,
                                     num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                                     experts_implementation="eager"), "eager"  # grouped_mm has no float64


@pytest.fixture(scope="module", autouse=True)
def _registered():
    tt.register()


@pytest.fixture
def calls(monkeypatch):
    """Counts of the tileattn entry points the integration called; "masks": the attn_mask
    shapes given to tileattn.attention (None for no mask)."""
    counts = {"attention": 0, "attention_with_kvcache": 0, "attention_varlen": 0}
    masks = []
    for name in list(counts):
        def spy(*args, _fn=getattr(tt, name), _name=name, **kwargs):
            counts[_name] += 1
            if _name == "attention":
                mask = kwargs.get("attn_mask")
                masks.append(None if mask is None else tuple(mask.shape))
            return _fn(*args, **kwargs)
        monkeypatch.setattr(tt, name, spy)
    counts["masks"] = masks
    return counts


def _model(name, impl):
    config, ref_impl = _config(name)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    with torch.no_grad():  # sinks start at 0 (empty init): make them matter
        for mod in model.modules():
            if hasattr(mod, "sinks"):
                mod.sinks.normal_()
    return model, ref_impl


def _prompts(lens, width, vocab=96):
    """Left-padded token ids (B, width) and their attention mask."""
    ids = torch.randint(1, vocab, (len(lens), width))
    mask = (torch.arange(width)[None, :] >= width - torch.tensor(lens)[:, None]).long()
    return ids * mask, mask


def _logits(model, impl, ids, mask, dtype=torch.float32):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.to(dtype)(ids, attention_mask=mask).logits


def _unpadded(model, impl, ids, mask, dtype):
    """Logits of each prompt run alone without padding, concatenated: (tokens, vocab)."""
    keep = mask.bool()
    return torch.cat([_logits(model, impl, ids[b, keep[b]][None], None, dtype)[0] for b in range(len(ids))])


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gpt_oss"])
def test_logits_match_with_left_padding(name, calls):
    model, ref_impl = _model(name, "tileattn")
    ids, mask = _prompts([13, 9, 1], 13)
    out = _logits(model, "tileattn", ids, mask)
    assert calls["attention"] == 2  # one per layer
    # plain causal layers get the key padding alone (3, 1, 1, 13); sliding ones the dense mask
    sliding = [False, False] if name == "llama" else [True, True] if name == "mistral" else [True, False]
    assert calls["masks"] == [(3, 1, 13, 13) if s else (3, 1, 1, 13) for s in sliding]
    lo = _unpadded(model, ref_impl, ids, mask, torch.float32)
    hi = _unpadded(model, "eager", ids, mask, torch.float64)
    assert_close(f"{name} logits", out[mask.bool()], hi, lo, fp32_plain=True)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gpt_oss"])
def test_greedy_generate_equal(name, calls):
    model, ref_impl = _model(name, "tileattn")
    ids, mask = _prompts([11, 6], 11)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        ours = model.generate(ids, **kw)
        model.set_attn_implementation(ref_impl)
        ref = model.generate(ids, **kw)
    assert torch.equal(ours, ref)
    assert calls["attention"] > 0


def test_plain_causal_and_decode_paths(calls):
    """No padding: the prompt runs causal=True without a mask, each new token the decode kernel."""
    model, _ = _model("llama", "tileattn")
    ids = torch.randint(1, 96, (2, 10))
    with torch.no_grad():
        ours = model.generate(ids, max_new_tokens=4, do_sample=False)
        model.set_attn_implementation("sdpa")
        ref = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, ref)
    assert calls == {"attention": 2, "attention_with_kvcache": 2 * 3, "attention_varlen": 0,  # prefill, 3 steps
                     "masks": [None, None]}


@pytest.mark.parametrize("name", ["llama", "gpt_oss"])
def test_packed_sequences_with_flash_keywords_run_varlen(name, calls):
    """Three sequences packed in one row with cu_seq_lens_*: each token sees its own sequence."""
    model, ref_impl = _model(name, "tileattn")
    lens = [5, 7, 3]
    ids = torch.randint(1, 96, (1, sum(lens)))
    cu = torch.tensor([0, 5, 12, 15])
    position_ids = torch.cat([torch.arange(n) for n in lens])[None]
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
    with torch.no_grad():
        out = model(ids, position_ids=position_ids, use_cache=False, **packed).logits[0]
        assert calls["attention_varlen"] == 2 and calls["attention"] == 0
    lo, hi = (torch.cat([_logits(model, impl, seq[None], None, dtype)[0] for seq in ids[0].split(lens)])
              for impl, dtype in ((ref_impl, torch.float32), ("eager", torch.float64)))
    assert_close(f"{name} packed logits", out, hi, lo, fp32_plain=True)


@pytest.mark.parametrize("lens", [[10, 10], [10, 5]], ids=["unpadded", "left_padded"])
def test_static_cache_generate_equal(lens):
    model, _ = _model("llama", "tileattn")
    ids, mask = _prompts(lens, 10)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        ours = model.generate(ids, **kw)
        model.set_attn_implementation("sdpa")
        ref = model.generate(ids, **kw)
    assert torch.equal(ours, ref)


def test_from_pretrained_and_set_attn_implementation(tmp_path, calls):
    model, _ = _model("llama", "sdpa")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="tileattn")
    assert loaded.config._attn_implementation == "tileattn"
    with torch.no_grad():
        loaded(torch.randint(1, 96, (1, 5)))
    assert calls["attention"] == 2
    model.set_attn_implementation("tileattn")
    assert model.config._attn_implementation == "tileattn"


def test_training_gradients_match_eager():
    """gpt-oss in train mode (dropout 0): attention weights' and sinks' gradients by the fp32
    rule against eager in float64, eager in fp32 the yardstick."""
    ids = torch.randint(1, 96, (2, 12))
    grads = {}
    for impl, dtype in (("eager", torch.float64), ("eager", torch.float32), ("tileattn", torch.float32)):
        model, _ = _model("gpt_oss", impl)
        model.to(dtype).train()
        model(ids, labels=ids).loss.backward()
        grads[impl, dtype] = {n: p.grad for n, p in model.named_parameters() if "self_attn" in n}
    for n, hi in grads["eager", torch.float64].items():
        assert_close(f"grad {n}", grads["tileattn", torch.float32][n], hi, grads["eager", torch.float32][n], c=3,
                     fp32_plain=True)


def test_dropout_in_training_changes_output():
    config, _ = _config("llama")
    config.attention_dropout = 0.5
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="tileattn")
    ids = torch.randint(1, 96, (1, 8))
    model.train()
    a, b = model(ids).logits, model(ids).logits
    model.eval()
    c, d = model(ids).logits, model(ids).logits
    assert not torch.equal(a, b) and torch.equal(c, d)
    a.sum().backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gpt_oss"])
def test_bf16_logits_and_generate_gpu(name):
    model, ref_impl = _model(name, "tileattn")
    model.cuda()
    ids, mask = (t.cuda() for t in _prompts([40, 23, 1], 40))
    hi = _unpadded(model, "eager", ids, mask, torch.float64)
    lo = _unpadded(model, ref_impl, ids, mask, torch.bfloat16)
    out = _logits(model, "tileattn", ids, mask, torch.bfloat16)
    assert_close(f"{name} bf16 logits", out[mask.bool()], hi, lo)
    kw = dict(attention_mask=mask[:2], max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        ours = model.generate(ids[:2], **kw)
        model.set_attn_implementation(ref_impl)
        ref = model.generate(ids[:2], **kw)
    assert torch.equal(ours, ref)


@pytest.mark.gpu
def test_static_cache_compiled_generate_gpu():
    """Static cache + torch.compile(fullgraph=True) of the forward: same tokens as sdpa."""
    model, _ = _model("llama", "sdpa")
    model.cuda().to(torch.bfloat16)
    ids, mask = (t.cuda() for t in _prompts([12, 7], 12))
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("tileattn")
        model.forward = torch.compile(model.forward, fullgraph=True)
        ours = model.generate(ids, **kw)
    assert torch.equal(ours, ref)
