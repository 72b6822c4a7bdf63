"""Real HuggingFace models, compiled with a spec, against the same models in eager mode.

The eager reference receives the pattern (AND causal) as a 4-D additive attention mask, which
transformers uses as given; the compiled model gets no mask at all, only the spec. Both
attention implementations ("eager" hand-written matmuls, "sdpa") must give the same logits.
"""

from __future__ import annotations

import pytest
import torch

import spcompile as sp

transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg), "model.layers.*.self_attn"


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                  n_positions=128)
    return transformers.GPT2LMHeadModel(cfg), "transformer.h.*.attn"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_compiled_model_equals_eager_with_the_mask(build, attn):
    torch.manual_seed(0)
    model, site_glob = build()
    model.eval()
    model.config._attn_implementation = attn
    n, window = 44, 7
    ids = torch.randint(0, 128, (1, n))
    spec = {"version": 1, "rules": [
        {"match": site_glob, "pattern": {"sliding": {"window": window, "causal": True}}}]}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="spcompile",
                             options={"spec": spec, "inner": "eager", "report": False})
    with torch.no_grad():
        out = compiled(ids).logits
    report = sp.last_report()
    assert len(report.rewritten) == 2, report.render()
    allowed = sp.dense_mask(sp.Sliding(window=window, causal=True), n, n)
    additive = torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = model(ids, attention_mask=additive).logits
    assert float((out - ref).abs().max()) < 1e-5
