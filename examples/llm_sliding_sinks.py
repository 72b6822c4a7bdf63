"""An LLM whose first layer stays dense and whose other layers see a causal window plus sinks.

The model is Llama-shaped (GQA via repeat_kv, causal SDPA) and knows nothing of sparsity; the
spec below decides per layer. Prints the report, checks the compiled logits against the same
model running with the pattern as an explicit mask, and on a GPU times both.

    python examples/llm_sliding_sinks.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spcompile as sp

SPEC = {
    "version": 1,
    "rules": [
        {"name": "retrieval-layer", "match": {"module": "layers.*.self_attn", "layers": "0"},
         "pattern": "dense"},
        {"name": "local+sinks", "match": "layers.*.self_attn",
         "pattern": {"any_of": [{"sliding": {"window": 64, "causal": True}},
                                {"global": {"first": 4}}]}},
    ],
}


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.reference_mask: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        group = self.heads // self.kv_heads  # repeat_kv, as HuggingFace writes it
        k = k[:, :, None].expand(b, self.kv_heads, group, n, self.head_dim).reshape(
            b, self.heads, n, self.head_dim)
        v = v[:, :, None].expand(b, self.kv_heads, group, n, self.head_dim).reshape(
            b, self.heads, n, self.head_dim)
        if self.reference_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.reference_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dim)
        self.self_attn = SelfAttention(dim, heads, kv_heads)
        self.post_attention_layernorm = nn.RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 512, dim: int = 256, heads: int = 8, kv_heads: int = 2,
                 layers: int = 4) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Layer(dim, heads, kv_heads) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def main(seq_len: int = 384) -> bool:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = TinyLM().to(device).eval()
    ids = torch.randint(0, 512, (2, seq_len), device=device)
    compiled = torch.compile(model, backend="spcompile",
                             options={"spec": SPEC, "report": False,
                                      "inner": "inductor" if device == "cuda" else "eager"})
    with torch.no_grad():
        logits = compiled(ids)
    report = sp.last_report()
    print(report.render())
    # Reference: layer 0 causal dense; the others the pattern AND causal, as explicit masks.
    local = sp.AnyOf(sp.Sliding(window=64, causal=True), sp.Global(first=4), causal=True)
    for i, layer in enumerate(model.layers):
        pattern = sp.Sliding(window=seq_len, causal=True) if i == 0 else local
        layer.self_attn.reference_mask = sp.dense_mask(pattern, seq_len, seq_len).to(device)
    with torch.no_grad():
        ref = model(ids)
    err = float((logits - ref).abs().max() / ref.abs().max())
    ok = len(report.rewritten) == 3 and err < 1e-4
    print(f"3 of 4 layers sparse: {len(report.rewritten) == 3}; max relative difference "
          f"{err:.2e} -> {'OK' if ok else 'FAILED'}")
    return ok


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
