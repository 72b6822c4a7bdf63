"""Real HuggingFace models, compiled with a spec, against the same models in eager mode.

The eager reference receives the pattern (AND causal, AND the padding when there is one) as a
4-D additive attention mask, which transformers uses as given; the compiled model gets only the
spec (and its own padding mask). Both attention implementations ("eager" hand-written matmuls,
"sdpa") must give the same outputs. ViT has no mask argument: its reference gets the mask
through a pre-hook on every attention module. Small random configs, no downloads.
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


def _mistral(sliding_window: int | None = None):
    cfg = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=256,
                                     sliding_window=sliding_window)
    return transformers.MistralForCausalLM(cfg), "model.layers.*.self_attn"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("build", [_llama, _gpt2, _mistral], ids=["llama", "gpt2", "mistral"])
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


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _compile(model, spec):
    torch._dynamo.reset()
    return torch.compile(model, backend="spcompile",
                         options={"spec": spec, "inner": "eager", "report": False})


def _spec(glob: str, pattern) -> dict:
    tree = pattern if isinstance(pattern, str) else pattern.to_dict()
    return {"version": 1, "rules": [{"match": glob, "pattern": tree}]}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mistral_own_window_is_the_pattern(attn):
    """Mistral's sliding_window builds a causal-window mask in the graph; a rule with exactly
    that window drops it and runs the window sparse: the plain eager model is the reference."""
    torch.manual_seed(0)
    model, site_glob = _mistral(sliding_window=7)
    model.eval()
    model.config._attn_implementation = attn
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        out = _compile(model, _spec(site_glob, sp.Sliding(window=7, causal=True)))(ids).logits
    assert len(sp.last_report().rewritten) == 2, sp.last_report().render()
    with torch.no_grad():
        ref = model(ids).logits
    assert float((out - ref).abs().max()) < 1e-5


def _bert():
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  max_position_embeddings=64)
    return transformers.BertModel(cfg), "encoder.layer.*.attention.self"


def _padding(n: int) -> torch.Tensor:
    """[2, n] HF attention_mask: sample 0 left-padded by 3, sample 1 right-padded by 6."""
    padding = torch.ones(2, n, dtype=torch.long)
    padding[0, :3] = 0
    padding[1, -6:] = 0
    return padding


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name, padded", [("bert", False), ("bert", True), ("llama", True)],
                         ids=["bert", "bert-padding", "llama-padding"])
def test_padded_batches_run_sparse(name, padded, attn):
    """BERT (encoder, a local window) and Llama (causal window): the model's padding mask runs
    with the pattern (AND) on the sparse kernel. Compared on the real tokens (padded positions
    are garbage in both, differently: a query that sees no key gives 0 in spcompile)."""
    torch.manual_seed(0)
    n = 30
    if name == "bert":
        model, site_glob = _bert()
        pattern = sp.Sliding(window=5)
    else:
        model, site_glob = _llama()
        model = model.model
        site_glob = site_glob.removeprefix("model.")
        pattern = sp.Sliding(window=6, causal=True)
    model.eval()
    model.config._attn_implementation = attn
    ids = torch.randint(0, 128, (2, n))
    padding = _padding(n) if padded else torch.ones(2, n, dtype=torch.long)
    kwargs = {"attention_mask": padding} if padded else {}
    with torch.no_grad():
        out = _compile(model, _spec(site_glob, pattern))(ids, **kwargs).last_hidden_state
    report = sp.last_report()
    assert len(report.rewritten) == 2, report.render()
    assert all(s.key_padding == padded for s in report.rewritten)
    allowed = sp.dense_mask(pattern, n, n)[None, None] & padding.bool()[:, None, None, :]
    with torch.no_grad():
        ref = model(ids, attention_mask=_additive(allowed)).last_hidden_state
    real = padding.bool()
    assert float((out - ref)[real].abs().max()) < 1e-5


def _vit():
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, image_size=16, patch_size=4)
    return transformers.ViTModel(cfg), "layers.*.attention"


def _with_attention_mask(model, mask: torch.Tensor):
    """Pre-hooks that hand ``mask`` to every ViT attention module (ViTModel takes none)."""
    def hook(module, args, kwargs):  # forward(hidden_states, attention_mask=None, ...)
        kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
        return (args[0], mask), kwargs

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
            if type(m).__name__ == "ViTAttention"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vit_with_cls_token(attn):
    """HF ViT's sequence is the 4x4 patch grid plus CLS: 17 tokens. A 1-D pattern runs over
    all of them; a neighborhood rule on the 4x4 grid cannot match 17 tokens and stays dense
    with that reason."""
    torch.manual_seed(0)
    model, site_glob = _vit()
    model.eval()
    model.config._attn_implementation = attn
    images = torch.randn(2, 3, 16, 16)
    pattern = sp.Blocked(block=6)
    with torch.no_grad():
        out = _compile(model, _spec(site_glob, pattern))(images).last_hidden_state
    report = sp.last_report()
    assert [s.module_path for s in report.rewritten] == ["layers.0.attention", "layers.1.attention"]
    hooks = _with_attention_mask(model, _additive(sp.dense_mask(pattern, 17, 17)[None, None]))
    try:
        with torch.no_grad():
            ref = model(images).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    assert float((out - ref).abs().max()) < 1e-5
    grid = sp.Neighborhood(shape=(4, 4), window=3)
    with torch.no_grad():
        _compile(model, _spec(site_glob, grid))(images)
    report = sp.last_report()
    assert not report.rewritten and all("holds 16 tokens" in s.reason for s in report.sites)


@pytest.mark.parametrize("build", [_mistral, _bert, _vit], ids=["mistral", "bert", "vit"])
def test_dense_spec_changes_nothing(build):
    torch.manual_seed(0)
    model, site_glob = build()
    model.eval()
    model.config._attn_implementation = "sdpa"
    x = torch.randn(2, 3, 16, 16) if build is _vit else torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        out = _compile(model, _spec(site_glob, "dense"))(x)[0]
    report = sp.last_report()
    assert not report.rewritten and len(report.sites) == 2
    assert all(s.reason == "the rule says dense" for s in report.sites)
    with torch.no_grad():
        assert torch.equal(out, model(x)[0])
