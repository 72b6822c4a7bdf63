"""The detect pass on graphs captured from real model code.

Every site found is also checked numerically: the test replaces it by
``F.scaled_dot_product_attention`` built only from the site's facts (q, k, v or their compact
GQA form, scale, mask and its kind, causal, layout, heads) and the graph must still compute the
same outputs, with every node the site claims gone after dead-code elimination. A wrong scale, a
mask read with the wrong polarity, a causal mask misrecognized or a wrong head split fails there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import models as M
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._dynamo.utils import counters

from spcompile.passes.detect import FORMS, find_attention
from spcompile.passes.site import (
    AttentionSite,
    Rejected,
    layer_index,
    normalize_module_path,
)

SCALE = (M.DIM // M.HEADS) ** -0.5


# --------------------------------------------------------------------------------------------
# Capturing and checking


@dataclass
class Detected:
    sites: list[AttentionSite]
    rejected: list[Rejected]
    graphs: list[fx.GraphModule]
    inputs: list[tuple[Any, ...]]

    def site_graph(self, site: AttentionSite) -> tuple[fx.GraphModule, tuple[Any, ...]]:
        for gm, args in zip(self.graphs, self.inputs, strict=True):
            if site.output.graph is gm.graph:
                return gm, args
        raise AssertionError("site from no captured graph")


def detect(model: Callable[..., Any], *args: Any, dynamic: bool | None = None,
           **kwargs: Any) -> Detected:
    """Compile with a backend that records each graph and its first real inputs, run once,
    then run the detect pass on every graph."""
    torch._dynamo.reset()
    graphs: list[fx.GraphModule] = []
    inputs: list[tuple[Any, ...]] = []

    def capture(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        index = len(graphs)
        graphs.append(gm)
        inputs.append(())

        def run(*a: Any) -> Any:
            if not inputs[index]:
                inputs[index] = a
            return gm.forward(*a)

        return run

    compiled = torch.compile(model, backend=capture, fullgraph=False, dynamic=dynamic)
    with torch.no_grad():
        compiled(*args, **kwargs)
    sites: list[AttentionSite] = []
    rejected: list[Rejected] = []
    for gm in graphs:
        s, r = find_attention(gm)
        sites += s
        rejected += r
    return Detected(sites, rejected, graphs, inputs)


def rewrite_with_sdpa(gm: fx.GraphModule, site: AttentionSite) -> None:
    """Replace ``site`` by an SDPA call that uses nothing but the site's facts."""
    g = gm.graph
    with g.inserting_before(site.output):
        gqa = site.is_gqa  # compact k/v, or k/v that already have fewer heads
        q, k, v = site.q, site.k_compact or site.k, site.v_compact or site.v
        if site.layout == "bshd":
            q, k, v = (g.call_method("transpose", (x, 1, 2)) for x in (q, k, v))
        elif site.layout == "bhsd-flattened":
            q, k, v = (g.call_method("unflatten", (x, 0, (site.batch, site.num_heads)))
                       for x in (q, k, v))
        mask = site.attn_mask
        if mask is not None and site.mask_kind == "block":
            mask = g.call_function(torch.logical_not, (mask,))
        if mask is not None and site.layout == "bhsd-flattened":
            mshape = site.attn_mask.meta["example_value"].shape
            if len(mshape) == 3 and mshape[0] == site.batch * site.num_heads:
                mask = g.call_method("unflatten", (mask, 0, (site.batch, site.num_heads)))
        out = g.call_function(F.scaled_dot_product_attention, (q, k, v),
                              {"attn_mask": mask, "is_causal": site.is_causal and mask is None,
                               "scale": site.scale if site.scale_node is None else
                               site.scale_node, "enable_gqa": gqa})
        if site.layout == "bshd":
            out = g.call_method("transpose", (out, 1, 2))
        elif site.layout == "bhsd-flattened":
            out = g.call_method("flatten", (out, 0, 1))
    site.output.replace_all_uses_with(out)
    g.eliminate_dead_code()
    gm.recompile()
    alive = set(g.nodes)
    assert not [n.name for n in site.nodes if n in alive], "site nodes still alive"


def assert_sdpa_equivalent(found: Detected) -> None:
    """Each site, replaced by SDPA from its facts alone, computes the same outputs."""
    references = [gm(*args) for gm, args in zip(found.graphs, found.inputs, strict=True)]
    for site in found.sites:
        gm, _ = found.site_graph(site)
        rewrite_with_sdpa(gm, site)
    for gm, args, ref in zip(found.graphs, found.inputs, references, strict=True):
        got = gm(*args)
        for a, b in zip(_tensors(got), _tensors(ref), strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def tokens(batch: int = M.BATCH, seq: int = M.SEQ) -> torch.Tensor:
    return torch.randn(batch, seq, M.DIM)


def only_rejection(found: Detected, count: int = 1) -> Rejected:
    assert not found.sites, [s.describe() for s in found.sites]
    assert len(found.rejected) == count, [r.reason for r in found.rejected]
    return found.rejected[0]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------
# Module paths and layers


@pytest.mark.parametrize("raw, path", [
    ("L['self'].layers.0.self_attn", "layers.0.self_attn"),
    ("L['self']._modules['layers']._modules['0'].self_attn", "layers.0.self_attn"),
    ("getattr(L['self'].layers, '0').self_attn", "layers.0.self_attn"),
    ("getattr(getattr(L['self'], 'model').layers, '11').attn", "model.layers.11.attn"),
    ("L['self'].layers[3].attn", "layers.3.attn"),
    ("L['self'].blocks['video'].attn", "blocks.video.attn"),
    ("L['model'].encoder.layer.1.attention.self", "encoder.layer.1.attention.self"),
    ("L['self']", ""),
    ("L['args'][0].layers.1.self_attn", "layers.1.self_attn"),  # forward(*args), wrapped
    ("self.h.2.attn", "h.2.attn"),
    ("L__self___layers_0_self_attn", "layers_0_self_attn"),
])
def test_normalize_module_path(raw: str, path: str) -> None:
    assert normalize_module_path(raw) == path


@pytest.mark.parametrize("path, layer", [
    ("model.layers.11.self_attn", 11), ("encoder.layer.3.attention.self", 3), ("h.0.attn", 0),
    ("blocks.7.attn", 7), ("transformer_blocks.2.attn1", 2), ("stages.1.blocks.4.attn", 4),
    ("down.0.attn", None), ("attn", None), (None, None),
])
def test_layer_index(path: str | None, layer: int | None) -> None:
    assert layer_index(path) == layer


# --------------------------------------------------------------------------------------------
# The forms, one test each (test_every_form_has_a_test keeps this list honest)

TESTED_FORMS = {"sdpa", "matmul", "bmm", "baddbmm", "einsum", "opaque"}


def test_every_form_has_a_test() -> None:
    names = [f.name for f in FORMS]
    assert len(names) == len(set(names))
    assert set(names) == TESTED_FORMS


SPELLINGS = {
    "plain": M.Spelling(),
    "hf-eager": M.Spelling(qk="matmul", kt="transpose23", scale="div", mask="add",
                           softmax="dtype_type_as", dropout="F_eval", pv="matmul"),
    "method-permute-rmul": M.Spelling(qk="method", kt="permute", scale="rmul", mask="radd",
                                      softmax="torch", dropout="module"),
    "mT-sqrt-fill-inf": M.Spelling(kt="mT", scale="div_sqrt", mask="fill_inf",
                                   softmax="method", pv="einsum"),
    "timm-prescale": M.Spelling(kt="swapaxes", scale="pre_q", mask="fill_min", softmax="dim3"),
    "prescale-both-where": M.Spelling(scale="pre_qk", mask="where", softmax="float_to"),
    "unscaled": M.Spelling(scale="none"),
    "t5-iadd": M.Spelling(scale="none", mask="iadd", softmax="float_to"),
    "in-place-methods": M.Spelling(scale="mul_", mask="fill_"),
}
MASK_KIND = {"add": "additive", "radd": "additive", "iadd": "additive", "fill_inf": "block",
             "fill_min": "block", "fill_": "block", "where": "allow"}


def input_mask(kind: str) -> torch.Tensor:
    """A padding-style mask [B, 1, 1, S] with the last two keys of sample 1 masked."""
    keep = torch.ones(M.BATCH, 1, 1, M.SEQ, dtype=torch.bool)
    keep[1, ..., -2:] = False
    if kind == "additive":
        return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    return keep if kind == "allow" else ~keep


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_form_matmul(name: str) -> None:
    spelling = SPELLINGS[name]
    layers = 2 if name == "plain" else 1  # one layer is enough to check a spelling
    model = M.Stack(*(M.HandAttention(spelling) for _ in range(layers))).eval()
    kind = MASK_KIND.get(spelling.mask)
    mask = input_mask(kind) if kind else None
    found = detect(model, tokens(), mask)
    assert not found.rejected, [r.reason for r in found.rejected]
    assert [s.module_path for s in found.sites] == ["layers.0.attn", "layers.1.attn"][:layers]
    assert [s.layer for s in found.sites] == [0, 1][:layers]
    for site in found.sites:
        assert site.form == "matmul" and site.layout == "bhsd"
        assert site.q_shape == (M.BATCH, M.HEADS, M.SEQ, M.DIM // M.HEADS)
        assert (site.num_kv_heads, site.kv_len, site.v_head_dim) == (M.HEADS, M.SEQ, 8)
        assert site.scale == pytest.approx(1.0 if spelling.scale == "none" else SCALE)
        assert not site.is_causal and site.dropout_p == 0.0
        assert site.mask_kind == kind
        assert (site.attn_mask is not None) == (kind is not None)
        if kind:
            assert site.attn_mask.op == "placeholder"
        assert site.module_type == "HandAttention"
        assert site.output in site.nodes and site.q not in site.nodes
        assert any(n.target in ("softmax", F.softmax, torch.softmax) for n in site.nodes)
    assert_sdpa_equivalent(found)


@pytest.mark.parametrize("mask", ["fill_inf", "add", "where"])
def test_causal_mask_built_in_forward_becomes_is_causal(mask: str) -> None:
    model = M.Stack(M.HandAttention(M.Spelling(mask=mask, mask_source="built"))).eval()
    found = detect(model, tokens())
    (site,) = found.sites
    assert site.is_causal and site.attn_mask is None and site.mask_kind is None
    assert "causal" in site.mask_note
    assert_sdpa_equivalent(found)


def test_causal_mask_built_on_the_meta_device_is_recognized() -> None:
    """``spcompile inspect`` traces models on meta: the mask is folded on the CPU instead."""
    with torch.device("meta"):
        model = M.Stack(M.HandAttention(M.Spelling(mask="where", mask_source="built"))).eval()
        x = tokens()
    (site,) = detect(model, x).sites
    assert site.is_causal and site.attn_mask is None


def test_mask_folding_respects_its_size_budget() -> None:
    model = M.Stack(M.HandAttention(M.Spelling(mask="fill_inf", mask_source="built"))).eval()
    found = detect(model, tokens())
    ((site,), _) = find_attention(found.graphs[0], fold_max_elements=M.SEQ)
    assert not site.is_causal and site.attn_mask is not None and site.mask_kind == "block"
    assert "too large" in site.mask_note


@pytest.mark.parametrize("repeat, kv_heads", [("expand", 2), ("interleave", 2),
                                              ("broadcast", 1)])
def test_form_matmul_gqa(repeat: str, kv_heads: int) -> None:
    model = M.Stack(M.HandAttention(kv_heads=kv_heads, kv_repeat=repeat)).eval()
    found = detect(model, tokens())
    (site,) = found.sites
    assert (site.num_heads, site.num_kv_heads) == (M.HEADS, kv_heads) and site.is_gqa
    if repeat == "broadcast":  # MQA: matmul broadcasts the single key/value head
        assert site.k_compact is None and not site.kv_repeat_nodes
    else:
        assert site.k_compact is not None and site.v_compact is not None
        assert site.k_compact.meta["example_value"].shape[1] == kv_heads
        assert site.kv_repeat_nodes and site.k not in site.nodes
    assert_sdpa_equivalent(found)


@pytest.mark.parametrize("variant", ["plain", "causal", "scale", "torch._C", "additive-mask",
                                     "bool-mask", "gqa-repeat", "gqa-enable"])
def test_form_sdpa(variant: str) -> None:
    kw: dict[str, Any] = {"causal": {"causal": True}, "scale": {"scale": 0.3},
                          "torch._C": {"fn": "C"}, "gqa-repeat": {"kv_heads": 2},
                          "gqa-enable": {"kv_heads": 2, "gqa": "enable_gqa"}}.get(variant, {})
    mask = {"additive-mask": input_mask("additive"), "bool-mask": input_mask("allow")}.get(
        variant)
    layers = 2 if variant == "plain" else 1
    model = M.Stack(*(M.SdpaAttention(**kw) for _ in range(layers))).eval()
    found = detect(model, tokens(), mask)
    assert not found.rejected
    assert [s.module_path for s in found.sites] == ["layers.0.attn", "layers.1.attn"][:layers]
    for site in found.sites:
        assert site.form == "sdpa" and site.nodes == (site.output,)
        assert site.q_shape == (M.BATCH, M.HEADS, M.SEQ, 8)
        assert site.scale == kw.get("scale")
        assert site.is_causal == (variant == "causal")
        assert site.num_kv_heads == kw.get("kv_heads", M.HEADS)
        assert (site.k_compact is not None) == (variant == "gqa-repeat")
        assert site.mask_kind == {"additive-mask": "additive", "bool-mask": "allow"}.get(variant)
    assert_sdpa_equivalent(found)


@pytest.mark.parametrize("masked", [False, True])
def test_form_baddbmm_diffusers(masked: bool) -> None:
    model = M.Stack(M.DiffusersAttention(), M.DiffusersAttention()).eval()
    mask = None
    if masked:
        mask = torch.zeros(M.BATCH, 1, M.SEQ)
        mask[1, :, -3:] = -10000.0  # diffusers' prepare_attention_mask uses -10000.0
    found = detect(model, tokens(), mask)
    assert not found.rejected, [r.reason for r in found.rejected]
    assert [s.module_path for s in found.sites] == ["layers.0.attn", "layers.1.attn"]
    for site in found.sites:
        assert site.form == "baddbmm" and site.layout == "bhsd-flattened"
        assert site.q_shape == (M.BATCH, M.HEADS, M.SEQ, 8)
        assert site.scale == pytest.approx(SCALE)
        assert (site.attn_mask is not None) == masked
        if masked:
            assert site.mask_kind == "additive"
    assert_sdpa_equivalent(found)


def test_form_bmm() -> None:
    found = detect(M.Stack(M.DiffusersAttention(scores="bmm")).eval(), tokens())
    (site,) = found.sites
    assert site.form == "bmm" and site.layout == "bhsd-flattened"
    assert (site.batch, site.num_heads, site.q_len, site.head_dim) == (M.BATCH, M.HEADS,
                                                                         M.SEQ, 8)
    assert site.scale == pytest.approx(SCALE)
    assert_sdpa_equivalent(found)


def test_bmm_bart_mask_on_a_head_view() -> None:
    mask = input_mask("additive").expand(M.BATCH, 1, M.SEQ, M.SEQ)
    found = detect(M.Stack(M.BartAttention()).eval(), tokens(), mask)
    assert not found.rejected, [r.reason for r in found.rejected]
    (site,) = found.sites
    assert site.form == "bmm" and site.layout == "bhsd-flattened"
    assert site.q_shape == (M.BATCH, M.HEADS, M.SEQ, 8)
    assert site.scale == 1.0  # q was scaled before the head split: the scale is part of q
    assert site.attn_mask is not None and site.mask_kind == "additive"
    assert_sdpa_equivalent(found)


def test_constant_additive_bias_is_kept_as_a_mask() -> None:
    found = detect(M.Custom("alibi").eval(), tokens())
    (site,) = found.sites
    assert site.scale == 0.25 and not site.is_causal and site.mask_kind == "additive"
    assert site.attn_mask is not None and "additive bias" in site.mask_note
    assert_sdpa_equivalent(found)


def test_bmm_without_visible_heads_is_rejected() -> None:
    q, k, v = (torch.randn(M.BATCH * M.HEADS, M.SEQ, 8) for _ in range(3))
    rejected = only_rejection(detect(M.flat_qkv_attention, q, k, v))
    assert rejected.form == "bmm" and "number cannot be recovered" in rejected.reason
    assert rejected.module_path is None


@pytest.mark.parametrize("layout", ["bhsd", "bshd", "ellipsis"])
def test_form_einsum(layout: str) -> None:
    found = detect(M.Stack(M.EinsumAttention(layout)).eval(), tokens())
    assert not found.rejected, [r.reason for r in found.rejected]
    (site,) = found.sites
    assert site.form == "einsum"
    assert site.layout == ("bshd" if layout == "bshd" else "bhsd")
    assert site.q_shape == (M.BATCH, M.HEADS, M.SEQ, 8)
    assert site.scale == pytest.approx(SCALE)
    assert_sdpa_equivalent(found)


class _TorchMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(M.DIM, M.HEADS, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_form_opaque_torch_modules_are_rejected_with_why() -> None:
    rejected = only_rejection(detect(_TorchMHA().eval(), tokens()))
    assert rejected.form == "opaque" and rejected.module_path == "attn"
    assert rejected.reason.startswith("nn.MultiheadAttention runs as one opaque")
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(M.DIM, M.HEADS, 64,
                                                               batch_first=True), 2,
                                    enable_nested_tensor=False).eval()
    found = detect(encoder, tokens())
    assert not found.sites and len(found.rejected) == 2
    assert [r.module_path for r in found.rejected] == ["layers.0", "layers.1"]
    assert all(r.form == "opaque" for r in found.rejected)


# --------------------------------------------------------------------------------------------
# Real model code


def test_dit_video_block() -> None:
    frames, height, width = 2, 3, 4
    latents = torch.randn(M.BATCH, 4, frames, height, width)
    found = detect(M.VideoDiT().eval(), latents, torch.rand(M.BATCH))
    assert not found.rejected
    assert [s.module_path for s in found.sites] == ["transformer_blocks.0.attn",
                                                    "transformer_blocks.1.attn"]
    assert [s.layer for s in found.sites] == [0, 1]
    for site in found.sites:
        assert site.q_shape == (M.BATCH, M.HEADS, frames * height * width, 8)
        assert site.kv_len == frames * height * width
        assert site.scale is None and not site.is_causal and site.attn_mask is None
        assert site.module_type == "VideoAttention"
    assert_sdpa_equivalent(found)


def _hf_model(name: str, impl: str, layers: int = 2
              ) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    T = pytest.importorskip("transformers")
    ids = torch.randint(0, 100, (M.BATCH, M.SEQ))
    common = {"num_hidden_layers": layers, "attn_implementation": impl}
    if name in ("llama", "mistral"):
        cls = T.LlamaModel if name == "llama" else T.MistralModel
        config_cls = T.LlamaConfig if name == "llama" else T.MistralConfig
        extra = {"sliding_window": 4} if name == "mistral" else {}
        config = config_cls(hidden_size=M.DIM, intermediate_size=64, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                            **extra, **common)
        return cls(config), (ids,), {}
    if name == "gpt2":
        config = T.GPT2Config(n_embd=M.DIM, n_layer=2, n_head=4, vocab_size=100,
                              n_positions=32, bos_token_id=0, eos_token_id=0,
                              attn_implementation=impl)
        return T.GPT2Model(config), (ids,), {}
    if name == "bert":
        config = T.BertConfig(hidden_size=M.DIM, num_attention_heads=4, intermediate_size=64,
                              vocab_size=100, max_position_embeddings=32, **common)
        padding = torch.ones(M.BATCH, M.SEQ, dtype=torch.long)
        padding[1, -3:] = 0
        return T.BertModel(config), (ids,), {"attention_mask": padding}
    config = T.ViTConfig(hidden_size=M.DIM, num_attention_heads=4, intermediate_size=64,
                         image_size=16, patch_size=4, **common)
    return T.ViTModel(config), (torch.randn(M.BATCH, 3, 16, 16),), {}


# name -> (module path of layer i, kv heads, q_len, causal, mask window, mask kept)
HF_EXPECTED = {
    "llama": ("layers.{}.self_attn", 2, M.SEQ, True, None, False),
    "mistral": ("layers.{}.self_attn", 2, M.SEQ, True, 4, True),
    "gpt2": ("h.{}.attn", 4, M.SEQ, True, None, False),
    "bert": ("encoder.layer.{}.attention.self", 4, M.SEQ, False, None, True),
    "vit": (None, 4, (16 // 4) ** 2 + 1, False, None, False),
}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(HF_EXPECTED))
def test_huggingface(name: str, impl: str) -> None:
    model, args, kwargs = _hf_model(name, impl)
    found = detect(model.eval(), *args, **kwargs)
    path, kv_heads, q_len, causal, window, mask_kept = HF_EXPECTED[name]
    assert not found.rejected, [r.reason for r in found.rejected]
    assert len(found.sites) == 2
    for i, site in enumerate(found.sites):
        assert site.form == ("matmul" if impl == "eager" else "sdpa")
        if path is not None:
            assert site.module_path == path.format(i)
        else:
            assert site.module_path.endswith("attention") and "Attention" in site.module_type
        assert site.layer == i
        assert site.q_shape == (M.BATCH, 4, q_len, 8)
        assert (site.num_kv_heads, site.kv_len) == (kv_heads, q_len)
        assert site.scale == pytest.approx(SCALE)
        assert site.is_causal == causal
        assert site.mask_window == window
        assert (site.attn_mask is not None) == mask_kept
        if impl == "eager" and kv_heads != 4:
            assert site.k_compact is not None  # repeat_kv seen through
    assert_sdpa_equivalent(found)


def test_huggingface_output_attentions_stays_dense() -> None:
    model, args, _ = _hf_model("llama", "eager", layers=1)
    rejected = only_rejection(detect(model.eval(), *args, output_attentions=True))
    assert rejected.module_path == "layers.0.self_attn" and rejected.layer == 0
    assert rejected.reason.startswith("attention weights are also returned")


@pytest.mark.parametrize("fused", [True, False])
def test_timm_vit(fused: bool) -> None:
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=M.DIM, depth=2,
                              num_heads=M.HEADS, num_classes=0).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    found = detect(model, torch.randn(M.BATCH, 3, 32, 32))
    assert not found.rejected
    assert [s.module_path for s in found.sites] == ["blocks.0.attn", "blocks.1.attn"]
    for site in found.sites:
        assert site.form == ("sdpa" if fused else "matmul")
        assert site.q_shape == (M.BATCH, M.HEADS, 17, 8)
        assert site.scale == (None if fused else pytest.approx(SCALE))
    assert_sdpa_equivalent(found)


# --------------------------------------------------------------------------------------------
# Candidates left dense, and things that are not attention


@pytest.mark.parametrize("what, reason", [
    ("probs", "attention weights are also returned"),
    ("scores", "attention scores (before softmax) are also returned"),
])
def test_intermediates_used_outside_stay_dense(what: str, reason: str) -> None:
    rejected = only_rejection(detect(M.ReturnsWeights(what).eval(), tokens()))
    assert rejected.reason.startswith(reason) and "output" in rejected.reason


@pytest.mark.parametrize("kind, reason", [
    ("wrong_dim", "softmax over dim -2 of the 4-D scores"),
    ("softcap", "unsupported op tanh between q @ k^T and softmax"),
    ("temperature", "multiplied by a tensor computed at run time"),
    ("mask_5d", "mask of unsupported shape [1, 2, 4, 8, 8]"),
])
def test_unsupported_steps_are_rejected_with_reason(kind: str, reason: str) -> None:
    rejected = only_rejection(detect(M.Custom(kind).eval(), tokens()))
    assert rejected.form == "matmul" and reason in rejected.reason


def test_training_mode_dropout_is_rejected() -> None:
    model = M.Stack(M.HandAttention(M.Spelling(dropout="module")),
                    M.SdpaAttention(p=0.1)).train()
    found = detect(model, tokens())
    assert not found.sites
    assert [r.form for r in found.rejected] == ["matmul", "sdpa"]
    assert "dropout in training mode (p=0.1)" in found.rejected[0].reason
    assert "dropout in training mode (dropout_p=0.1" in found.rejected[1].reason
    # F.dropout(training=False) is a no-op whatever the module's mode
    eval_dropout = M.Stack(M.HandAttention(M.Spelling(dropout="F_eval"))).train()
    assert len(detect(eval_dropout, tokens()).sites) == 1


def _causal_prefix_queries(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q[:, :, -4:], k, v, is_causal=True)


def test_sdpa_top_left_causal_is_rejected() -> None:
    q, k, v = (torch.randn(2, 4, 8, 8) for _ in range(3))
    rejected = only_rejection(detect(_causal_prefix_queries, q, k, v))
    assert "is_causal=True with q_len 4 != kv_len 8" in rejected.reason


def test_pretransposed_key_is_rejected() -> None:
    q, kt, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    rejected = only_rejection(detect(M.pretransposed_key, q, kt, v))
    assert "not a transposed key" in rejected.reason


def test_matmuls_that_are_not_attention() -> None:
    found = detect(M.MLP().eval(), tokens())
    assert found.sites == [] and found.rejected == []


# --------------------------------------------------------------------------------------------
# Pass properties


def test_dynamic_shapes_give_symbolic_facts_and_keep_built_masks() -> None:
    model = M.Stack(M.HandAttention(M.Spelling(mask="fill_inf", mask_source="built")),
                    M.SdpaAttention(causal=True), M.SdpaAttention(scale=0.3)).eval()
    found = detect(model, tokens(seq=12), dynamic=True)
    hand, causal, scaled = found.sites
    assert isinstance(hand.q_len, torch.SymInt) and isinstance(causal.kv_len, torch.SymInt)
    assert hand.num_heads == M.HEADS and hand.head_dim == 8
    assert not hand.is_causal and hand.attn_mask is not None and hand.mask_kind == "block"
    assert hand.mask_note.startswith("kept")
    assert causal.is_causal and causal.attn_mask is None and causal.scale is None
    # float attributes became graph inputs: the scale is known at capture, read at run time
    assert hand.scale == pytest.approx(SCALE) and hand.scale_node is not None
    assert scaled.scale == pytest.approx(0.3)
    assert_sdpa_equivalent(found)


def test_detection_leaves_graph_untouched_and_counts() -> None:
    model = M.Stack(M.HandAttention(), M.SdpaAttention(), M.Custom("wrong_dim")).eval()
    found = detect(model, tokens())
    gm = found.graphs[0]
    before = gm.code
    counters.clear()
    sites, rejected = find_attention(gm)
    assert gm.code == before
    assert [s.form for s in sites] == ["matmul", "sdpa"] and len(rejected) == 1
    assert counters["spcompile"] == {"detect_matmul": 1, "detect_sdpa": 1, "rejected_matmul": 1}
    all_nodes = [n for s in sites for n in s.nodes] + list(rejected[0].nodes)
    assert len(all_nodes) == len(set(all_nodes))  # no node in two sites


def test_a_failing_matcher_becomes_a_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    import spcompile.passes.detect as detect_module

    def boom(node: fx.Node, ctx: Any) -> None:
        raise RuntimeError("boom")

    found = detect(M.Stack(M.SdpaAttention()).eval(), tokens())
    monkeypatch.setattr(detect_module, "FORMS", (detect_module.Form("sdpa", detect_module.SDPA,
                                                                    boom, "raises"),))
    sites, rejected = find_attention(found.graphs[0])
    assert not sites and [r.reason for r in rejected] == [
        "detection failed (RuntimeError: boom)"]


def test_site_scale_defaults_and_describe() -> None:
    (site,) = detect(M.Stack(M.SdpaAttention()).eval(), tokens()).sites
    assert site.scale is None  # SDPA's default, 1/sqrt(head_dim)
    text = site.describe()
    assert text.startswith("layers.0.attn [sdpa] 2x4x8x8x8") and "scale=default" in text
    assert math.isclose(SCALE, 1 / math.sqrt(site.head_dim))
