"""transformers generate() tokens/s on one GPU: a Llama-shaped model with random weights (bf16),
attn_implementation "tileattn" vs "sdpa" (torch's default backend) vs "sdpa" with the flash
backend forced; batch 1 and 16, prompts 512 and 4096 tokens; eager (dynamic cache) and static
cache + torch.compile.

Decode tokens/s = B * (new - 1) / (t(new tokens) - t(1 token)): two timed generate() calls
after a warm-up call (which also compiles), so prefill drops out. The model has fewer layers
than Llama-3-8B (``--layers``) and a 32k vocabulary so a case takes seconds; attention is the
same per layer (Hq=32, Hkv=8, D=128). Compiled cases cost a compile each, so only
``--compile-cases`` of them run (B=1/512 first). A failing case is recorded, not fatal.

    python3 benchmarks/hf_generate.py OUT.json [--new 16] [--layers 8] [--compile-cases 3]
"""

import argparse
import contextlib
import json
import time
import traceback

import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel

import tileattn.integrations.transformers as tt

IMPLS = {"tileattn": ("tileattn", None), "sdpa": ("sdpa", None), "sdpa-flash": ("sdpa", SDPBackend.FLASH_ATTENTION)}


def model(layers):
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                      num_key_value_heads=8, num_hidden_layers=layers, vocab_size=32000,
                                      max_position_embeddings=8192)
    with torch.device("cuda"):
        m = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def timed_generate(m, ids, new, static):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if static:
        kw["cache_implementation"] = "static"
    torch.cuda.synchronize()
    start = time.perf_counter()
    m.generate(ids, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def case(m, impl, batch, prompt, new, static):
    name, backend = IMPLS[impl]
    m.set_attn_implementation(name)
    ids = torch.randint(1, 32000, (batch, prompt), device="cuda")
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext(), torch.no_grad():
        timed_generate(m, ids, new, static)  # warm-up (and compile)
        one = timed_generate(m, ids, 1, static)
        full = timed_generate(m, ids, new, static)
    return {"prefill_ms": one * 1e3, "decode_tok_s": batch * (new - 1) / (full - one), "total_s": full}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--compile-cases", type=int, default=3, help="compiled cases to run (each compiles)")
    args = parser.parse_args()
    tt.register()
    m = model(args.layers)
    plan = [(impl, b, p, False) for b, p in ((1, 512), (1, 4096), (16, 512), (16, 4096)) for impl in IMPLS]
    plan += [(impl, 1, 512, True) for impl in IMPLS][: args.compile_cases]
    results = []
    eager_forward = m.forward
    for impl, batch, prompt, static in plan:
        row = dict(impl=impl, B=batch, prompt=prompt, new=args.new, mode="static+compile" if static else "eager")
        m.forward = torch.compile(eager_forward) if static else eager_forward
        torch._dynamo.reset()
        try:
            row.update(case(m, impl, batch, prompt, args.new, static))
            print(f"{row['mode']:15s} {impl:10s} B={batch:2d} prompt={prompt:5d} "
                  f"{row['decode_tok_s']:9.1f} tok/s  prefill {row['prefill_ms']:.1f} ms", flush=True)
        except Exception as err:  # recorded, not fatal
            row.update(error=f"{type(err).__name__}: {err}", trace=traceback.format_exc(limit=3))
            print(f"{row['mode']:15s} {impl:10s} B={batch:2d} prompt={prompt:5d} FAILED {row['error'][:200]}",
                  flush=True)
        results.append(row)
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                       "gpu": torch.cuda.get_device_name(), "layers": args.layers, "cases": results}, f, indent=1)


if __name__ == "__main__":
    main()
