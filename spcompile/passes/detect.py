"""The detect pass: find attention sites in the FX graph that dynamo captured.

    sites, rejected = find_attention(gm)

Nothing is rewritten here. :data:`FORMS` lists the ways attention is written, one named entry
per form with the op that anchors it and its matcher; a matcher returns an
:class:`~spcompile.passes.site.AttentionSite`, a :class:`~spcompile.passes.site.Rejected`
(looked like attention, cannot be replaced: attention weights used elsewhere, dropout in
training mode, ...) or None (not attention). The hand-written forms differ only in how
``q @ k^T`` is spelled (``matmul``/``@``, ``bmm``, ``baddbmm``, ``einsum``); from the scores on
they share one walk: scale, mask, softmax, casts, dropout, ``@ v``. The ``opaque`` form names
PyTorch's fused modules (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``), which are
always rejected because their q, k, v never exist as tensors in the graph.

Every site and every rejection bumps ``torch._dynamo.utils.counters["spcompile"]``
(``detect_<form>`` / ``rejected_<form>``), as Inductor's attention matcher does, and is logged
at debug level on the ``spcompile`` logger.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import fx
from torch._dynamo.utils import counters

from .fxutil import (
    ADD,
    BADDBMM,
    BMM,
    CAST,
    DIV,
    DROPOUT,
    EINSUM,
    IDENTITY,
    MASKED_FILL,
    MATMUL,
    MATRIX_T,
    MUL,
    OPAQUE_ATTENTION,
    PERMUTE,
    SDPA,
    SOFTMAX,
    TRANSPOSE,
    VIEW,
    WHERE,
    Folder,
    Op,
    arg,
    describe,
    differ,
    is_attribute,
    is_large_negative,
    lengths_differ,
    ndim,
    norm_dim,
    number,
    runtime_scalar,
    same_size,
    scalar,
    shape,
    tensor_meta,
    varargs,
)
from .layout import einsum_layout, einsum_operands, heads_of_flattened, unrepeat_kv
from .masks import MaskFacts, check_mask_shape, key_padding_facts, mask_facts
from .site import AttentionSite, Rejected, layer_index, module_of

__all__ = ["FOLD_MAX_ELEMENTS", "FORMS", "Form", "find_attention"]

log = logging.getLogger("spcompile")

FOLD_MAX_ELEMENTS = 1 << 26
"""Largest intermediate (in elements) evaluated when checking whether a mask built inside the
graph is causal: 2**26 is HuggingFace's ``[B, 1, S, S]`` mask at B=4, S=4096 (256 MB in
float32, on the mask's device). Larger masks are kept and the site stays masked
(``is_causal`` False, ``mask_note`` says why)."""

Found = AttentionSite | Rejected | None


@dataclass(frozen=True)
class Form:
    """One way of writing attention: the op that anchors a candidate, and its matcher."""

    name: str
    anchor: Op
    match: Callable[[fx.Node, Context], Found]
    summary: str


@dataclass
class Context:
    """State shared by the matchers during one :func:`find_attention` call."""

    gm: fx.GraphModule
    folder: Folder
    claimed: set[fx.Node] = field(default_factory=set)


def find_attention(gm: fx.GraphModule, *, fold_max_elements: int = FOLD_MAX_ELEMENTS
                   ) -> tuple[list[AttentionSite], list[Rejected]]:
    """All attention sites of ``gm``, and the candidates left dense with their reasons.

    Sites come in graph order; no node belongs to two sites. ``gm`` is not modified.
    """
    ctx = Context(gm, Folder(gm, fold_max_elements))
    sites: list[AttentionSite] = []
    rejected: list[Rejected] = []
    for node in list(gm.graph.nodes):
        if node in ctx.claimed:
            continue
        for form in FORMS:
            if not form.anchor.matches(node):
                continue
            try:
                found = form.match(node, ctx)
            except Exception as e:  # a matcher bug must not break the user's compile
                log.warning("spcompile: detecting attention at %s failed", node.format_node(),
                            exc_info=True)
                found = _reject(form.name, node, [f"detection failed ({type(e).__name__}: "
                                                  f"{e})"], (node,))
            if found is None:
                continue
            ctx.claimed.update(found.nodes)
            if isinstance(found, AttentionSite):
                sites.append(found)
                counters["spcompile"][f"detect_{form.name}"] += 1
                log.debug("attention site: %s", found.describe())
            else:
                rejected.append(found)
                counters["spcompile"][f"rejected_{form.name}"] += 1
                log.debug("attention candidate %s at %s left dense: %s", node.name,
                          found.module_path or "?", found.reason)
            break
    return sites, rejected


# --------------------------------------------------------------------------------------------
# F.scaled_dot_product_attention


@dataclass
class _Scale:
    """The factors met on the way: constants, and numbers known only at run time
    (``(node, capture-time value, divides)``, see :func:`~.fxutil.runtime_scalar`)."""

    const: float = 1.0
    runtime: list[tuple[fx.Node, float, bool]] = field(default_factory=list)
    default: bool = False  # SDPA without a scale: 1/sqrt(head_dim)

    def apply(self, step: tuple[fx.Node, float, fx.Node | None, bool]) -> fx.Node:
        tensor, factor, runtime, divides = step
        if runtime is None:
            self.const *= factor
        else:
            self.runtime.append((runtime, factor, divides))
        return tensor

    def resolve(self) -> tuple[float | None, fx.Node | None, str | None]:
        """(scale, run-time scale node, problem)."""
        if self.default:
            return None, None, None
        if not self.runtime:
            return self.const, None, None
        value = self.const
        for _, v, divides in self.runtime:
            value = value / v if divides else value * v
        if len(self.runtime) == 1 and not self.runtime[0][2] and self.const == 1.0:
            return self.runtime[0][1], self.runtime[0][0], None
        return value, None, ("the scale combines a float known only at run time (a module "
                             "attribute under torch.compile(dynamic=True)) with other factors")


def match_sdpa(node: fx.Node, ctx: Context) -> Found:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
    enable_gqa)``, q ``[B, H, S, D]`` (or ``[B*H, S, D]``); k/v possibly ``repeat_kv``-ed."""
    q, k, v = arg(node, 0, "query", None), arg(node, 1, "key", None), arg(node, 2, "value", None)
    if not all(isinstance(x, fx.Node) for x in (q, k, v)):
        return None
    mask = arg(node, 3, "attn_mask", None)
    dropout_p = arg(node, 4, "dropout_p", 0.0)
    is_causal = arg(node, 5, "is_causal", False)
    scale_arg = arg(node, 6, "scale", None)
    problems: list[str] = []
    p = number(dropout_p)
    if p is None:
        problems.append(f"dropout_p is not a constant ({dropout_p!r})")
    elif p > 0:
        problems.append(f"dropout in training mode (dropout_p={p:g} in "
                        f"scaled_dot_product_attention)")
    if not isinstance(is_causal, bool):
        problems.append(f"is_causal is not a constant ({is_causal!r})")
        is_causal = False
    scale = _Scale(default=scale_arg is None)
    if scale_arg is not None:
        const, runtime = scalar(scale_arg, ctx.folder), runtime_scalar(scale_arg)
        if const is not None:
            scale.const = const
        elif runtime is not None and isinstance(scale_arg, fx.Node):
            scale.runtime.append((scale_arg, runtime, False))
        else:
            problems.append("the scale is a tensor computed at run time")
    if mask is not None and not isinstance(mask, fx.Node):
        problems.append(f"attn_mask is not a tensor ({mask!r})")
        mask = None
    rank = ndim(q)
    layout = {4: "bhsd", 3: "bhsd-flattened"}.get(rank or 0)
    if layout is None:
        problems.append(f"q has {rank} dims; expected [B, H, S, D] or [B*H, S, D]")
        return _reject("sdpa", node, problems, (node,))
    mask_meta = tensor_meta(mask)
    kind = None
    if mask is not None:
        kind = "additive" if mask_meta is None or mask_meta.is_floating_point() else "allow"
    return _build("sdpa", ctx, anchor=node, q=q, k=k, v=v, output=node, layout=layout,
                  nodes=[node], scale=scale, mask=mask, mask_kind=kind, sdpa_causal=is_causal,
                  problems=problems)


_OPAQUE_REASONS = {
    "multi_head_attention_forward": "nn.MultiheadAttention",
    "_native_multi_head_attention": "nn.MultiheadAttention's inference fast path",
    "_transformer_encoder_layer_fwd": "nn.TransformerEncoderLayer's inference fast path",
}


def match_opaque(node: fx.Node, ctx: Context) -> Found:
    """PyTorch's fused modules reach the graph as one call that projects q, k, v inside, so no
    q, k, v tensors exist to hand to a kernel: always a Rejected, so that users learn why
    (torchvision's ViT and nn.TransformerEncoder are built on them)."""
    name = getattr(node.target, "__name__", str(node.target))
    what = _OPAQUE_REASONS.get(name, name)
    return _reject("opaque", node, [f"{what} runs as one opaque {name} call (projections and "
                                    f"attention inside it); there are no q, k, v tensors to "
                                    f"rewrite"], (node,))


# --------------------------------------------------------------------------------------------
# Hand-written attention: how q @ k^T is spelled


@dataclass
class _ScoreInputs:
    """What a product form reads from its ``q @ k^T`` node."""

    q: fx.Node
    k: fx.Node | None
    layout: str | None
    scale: _Scale
    aux: list[fx.Node] = field(default_factory=list)  # pre-scales, transposes, ignored inputs
    problem: str | None = None
    mask: fx.Node | None = None


def match_matmul(node: fx.Node, ctx: Context) -> Found:
    """``q @ k.transpose(-2, -1)`` / ``torch.matmul`` / ``Tensor.matmul`` on ``[B, H, S, D]``
    (or ``[B*H, S, D]``), then the shared softmax walk."""
    return _match_two_operand(node, ctx, "matmul", "other")


def match_bmm(node: fx.Node, ctx: Context) -> Found:
    """``torch.bmm(q, k.transpose(1, 2))`` on ``[B*H, S, D]``; heads from the reshapes."""
    return _match_two_operand(node, ctx, "bmm", "mat2")


def _match_two_operand(node: fx.Node, ctx: Context, form: str, second: str) -> Found:
    a, b = arg(node, 0, "input", None), arg(node, 1, second, None)
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    return _walk(ctx, form, node, _score_inputs(a, b, ctx))


def match_baddbmm(node: fx.Node, ctx: Context) -> Found:
    """``torch.baddbmm(bias, q, k^T, beta=b, alpha=scale)`` (diffusers' ``get_attention_scores``):
    ``beta=0`` ignores ``bias`` (an empty tensor), ``beta=1`` adds it as the mask."""
    bias, a, b = arg(node, 0, "input", None), arg(node, 1, "batch1", None), \
        arg(node, 2, "batch2", None)
    if not all(isinstance(x, fx.Node) for x in (bias, a, b)):
        return None
    inputs = _score_inputs(a, b, ctx)
    beta, alpha = number(node.kwargs.get("beta", 1)), number(node.kwargs.get("alpha", 1))
    if alpha is None or beta is None:
        inputs.problem = inputs.problem or "baddbmm with non-constant alpha or beta"
        return _walk(ctx, "baddbmm", node, inputs)
    inputs.scale.const *= alpha
    if beta == 0:
        inputs.aux.append(bias)
    elif beta == 1:
        inputs.mask = bias
    else:
        inputs.problem = inputs.problem or f"baddbmm with beta={beta:g} scales the mask"
    return _walk(ctx, "baddbmm", node, inputs)


def match_einsum(node: fx.Node, ctx: Context) -> Found:
    """``torch.einsum("bhqd,bhkd->bhqk", q, k)`` and other spellings whose operands are
    ``[B, H, S, D]``, ``[B, S, H, D]`` or ``[B*H, S, D]``."""
    parsed = einsum_operands(node)
    if parsed is None or len(parsed[0]) != 2:
        return None
    (sq, sk), out, (a, b) = parsed
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    contracted = [c for c in sq if c in sk and c not in out]
    only_q, only_k = [c for c in sq if c not in sk], [c for c in sk if c not in sq]
    if len(contracted) != 1 or len(only_q) != 1 or len(only_k) != 1:
        return None
    d, i, j = contracted[0], only_q[0], only_k[0]
    batch = "".join(c for c in sq if c not in (i, d))
    if out != batch + i + j or sorted(batch) != sorted(c for c in sk if c not in (j, d)):
        return None
    scale = _Scale()
    q, q_aux = _peel_scale(a, scale, ctx)
    k, k_aux = _peel_scale(b, scale, ctx)
    q_layout, k_layout = einsum_layout(sq, batch, i, d), einsum_layout(sk, batch, j, d)
    inputs = _ScoreInputs(q, k, q_layout, scale, q_aux + k_aux)
    if q_layout in (None, "transposed") or k_layout is None:
        inputs.problem = f"einsum {node.args[0]!r}: unsupported layout of q or k"
        inputs.layout = None
    elif k_layout == "transposed":
        inputs.problem = (f"einsum {node.args[0]!r}: the key enters transposed ([.., D, S]); "
                          f"no untransposed key in the graph")
    elif k_layout != q_layout:
        inputs.problem = f"einsum {node.args[0]!r}: q and k have different layouts"
    return _walk(ctx, "einsum", node, inputs)


def _score_inputs(a: fx.Node, b: fx.Node, ctx: Context) -> _ScoreInputs:
    """q and k from the operands of ``a @ b`` where ``b`` should be ``k^T``."""
    scale = _Scale()
    q, q_aux = _peel_scale(a, scale, ctx)
    k, k_aux, problem = _untranspose(b, scale, ctx)
    rank = ndim(q)
    layout = {4: "bhsd", 3: "bhsd-flattened"}.get(rank or 0)
    if layout is None and problem is None:
        problem = f"q has {rank} dims; expected [B, H, S, D] or [B*H, S, D]"
    return _ScoreInputs(q, k, layout, scale, q_aux + k_aux, problem)


def _peel_scale(node: fx.Node, scale: _Scale, ctx: Context) -> tuple[fx.Node, list[fx.Node]]:
    """Strip ``q * c`` / ``q / c`` / ``c * q`` used only by the product: (q, peeled nodes)."""
    peeled = []
    while len(node.users) == 1:
        step = _scalar_step(node, None, ctx)
        if step is None:
            break
        peeled.append(node)
        node = scale.apply(step)
    return node, peeled


def _scalar_step(node: fx.Node, chain_input: fx.Node | None, ctx: Context
                 ) -> tuple[fx.Node, float, fx.Node | None, bool] | None:
    """(tensor operand, factor, run-time number node or None, divides) when ``node``
    multiplies or divides a tensor by a number; with ``chain_input`` given, the tensor operand
    must be that node."""
    if MUL.matches(node) and len(node.args) == 2:
        for tensor, other in (node.args, node.args[::-1]):
            if isinstance(tensor, fx.Node) and (chain_input is None or tensor is chain_input):
                c = scalar(other, ctx.folder)
                if c is not None:
                    return tensor, c, None, False
                r = runtime_scalar(other)
                if r is not None:
                    return tensor, r, other, False
    elif DIV.matches(node) and len(node.args) == 2 and node.kwargs.get("rounding_mode") is None:
        tensor, other = node.args
        if isinstance(tensor, fx.Node) and (chain_input is None or tensor is chain_input):
            c = scalar(other, ctx.folder)
            if c not in (None, 0.0):
                return tensor, 1.0 / c, None, False  # type: ignore[operator]
            r = runtime_scalar(other)
            if r not in (None, 0.0):
                return tensor, r, other, True  # type: ignore[return-value]
    return None


def _untranspose(kt: fx.Node, scale: _Scale, ctx: Context
                 ) -> tuple[fx.Node | None, list[fx.Node], str | None]:
    """(k, factor, nodes, problem) for the second operand of ``q @ k^T``.

    Accepts ``k.transpose(-2, -1)`` (any spelling of the last two dims, ``swapaxes``),
    ``k.permute(..., -1, -2)``, ``k.mT``, optionally followed by ``.contiguous()``, with scalar
    scales on either side.
    """
    node, aux = _peel_scale(kt, scale, ctx)
    if IDENTITY.matches(node) and len(node.users) == 1:
        aux.append(node)
        node = node.args[0]
    rank = ndim(node)
    k = None
    if rank is not None and rank >= 2:
        if TRANSPOSE.matches(node):
            dims = {norm_dim(arg(node, 1, "dim0", None), rank),
                    norm_dim(arg(node, 2, "dim1", None), rank)}
            if dims == {rank - 2, rank - 1}:
                k = node.args[0]
        elif PERMUTE.matches(node):
            dims = [norm_dim(d, rank) for d in (varargs(node, 1) or node.kwargs.get("dims", ()))]
            if dims == [*range(rank - 2), rank - 1, rank - 2]:
                k = node.args[0]
        elif MATRIX_T.matches(node) or is_attribute(node, "mT"):
            k = node.args[0]
    if not isinstance(k, fx.Node):
        return None, aux, ("the key operand of q @ k^T is not a transposed key "
                                   "(k.transpose(-2, -1), k.mT or a permute of the last two "
                                   "dims)")
    aux.append(node)
    k, k_aux = _peel_scale(k, scale, ctx)
    return k, aux + k_aux, None


# --------------------------------------------------------------------------------------------
# The shared walk from the scores to the output


@dataclass
class _Step:
    kind: str  # scale | mask | softmax | pass | view | pv | unknown
    factor: tuple[fx.Node, float, fx.Node | None, bool] | None = None
    mask: fx.Node | None = None
    mask_kind: str | None = None
    v: fx.Node | None = None
    layout: str | None = None  # of v and the output, for pv steps
    problem: str | None = None


@dataclass
class _Walk:
    scale: _Scale
    chain: list[tuple[fx.Node, str]] = field(default_factory=list)  # (node, phase)
    mask: fx.Node | None = None
    mask_kind: str | None = None
    mask_before_scale: bool = False
    mask_target: tuple[Any, ...] | None = None  # shape of the scores the mask is applied to
    softmax: fx.Node | None = None
    pv: fx.Node | None = None
    v: fx.Node | None = None
    pv_layout: str | None = None
    problems: list[str] = field(default_factory=list)
    score_views: list[tuple[Any, ...]] = field(default_factory=list)
    in_place: set[fx.Node] = field(default_factory=set)  # scores.mul_(s), scores.masked_fill_


_MAX_STEPS = 32
_MAX_UNKNOWN = 2  # unsupported ops tolerated on the way, to name them in the rejection


def _walk(ctx: Context, form: str, product: fx.Node, inputs: _ScoreInputs) -> Found:
    """From ``q @ k^T`` forward to ``@ v``; None unless a softmax over scores and a product
    with ``v`` are found. Products below 3-D (``x @ W.t()`` on a 2-D input) are never
    attention here: attention always has batch or head dims."""
    if (ndim(product) or 0) < 3:
        return None
    w = _Walk(scale=inputs.scale, mask=inputs.mask,
              mask_kind="additive" if inputs.mask is not None else None,
              mask_target=shape(product) if inputs.mask is not None else None)
    cur, phase, unknown = product, "scores", 0
    w.chain.append((cur, phase))
    for _ in range(_MAX_STEPS):
        step, user = None, None
        for candidate in cur.users:
            if candidate in w.in_place:
                continue
            step = _classify(candidate, cur, phase, ctx)
            if step is not None:
                user = candidate
                break
        if step is None:
            users = [u for u in cur.users if u not in w.in_place]
            if len(users) != 1 or users[0].op not in ("call_function", "call_method") \
                    or unknown >= _MAX_UNKNOWN:
                return None
            unknown += 1
            user = users[0]
            where = "q @ k^T and softmax" if phase == "scores" else "softmax and @ v"
            step = _Step("unknown", problem=f"unsupported op {describe(user)} between {where}")
        if step.problem:
            w.problems.append(step.problem)
        if step.kind == "scale":
            if step.factor is not None:
                w.scale.apply(step.factor)
            if w.mask is not None and w.mask_kind == "additive":
                w.mask_before_scale = True
        elif step.kind == "mask":
            if w.mask is not None:
                w.problems.append("more than one mask or bias is applied to the scores")
            else:
                w.mask, w.mask_kind, w.mask_target = step.mask, step.mask_kind, shape(cur)
        elif step.kind == "view" and phase == "scores":
            s = shape(user)
            if s is not None and len(s) == 4:
                w.score_views.append(s)
        elif step.kind == "softmax":
            w.softmax, phase = user, "probs"
        elif step.kind == "pv":
            w.pv, w.v, w.pv_layout = user, step.v, step.layout
            break
        if _is_in_place(user):
            w.in_place.add(user)  # mutates cur: the chain goes on from cur's later users
            continue
        cur = user
        w.chain.append((cur, phase))
    if w.pv is None or w.softmax is None:
        return None
    return _finish_walk(ctx, form, product, inputs, w)


def _is_in_place(node: fx.Node) -> bool:
    """``x.mul_(s)`` and friends: dynamo keeps using ``x`` afterwards, not this node
    (``x += m`` is different: dynamo rebinds ``x`` to the ``iadd`` node)."""
    return node.op == "call_method" and str(node.target).endswith("_") and \
        not str(node.target).startswith("__")


def _classify(user: fx.Node, cur: fx.Node, phase: str, ctx: Context) -> _Step | None:
    """What ``user`` does to the chain value ``cur``, or None if it is not a known step."""
    first = user.args[0] if user.args else None
    if first is cur and (IDENTITY.matches(user) or
                         (CAST.matches(user) and (user.target != "type" or len(user.args) > 1
                                                  or user.kwargs))):
        return _Step("pass")
    if first is cur and VIEW.matches(user):
        before, after = shape(cur), shape(user)
        if before is not None and after is not None and len(before) >= 2 and len(after) >= 2 \
                and same_size(before[-1], after[-1]) and same_size(before[-2], after[-2]):
            return _Step("view")
        return None
    if phase == "scores":
        return _classify_scores(user, cur, ctx)
    if first is cur and DROPOUT.matches(user):
        p = number(arg(user, 1, "p", 0.5))
        training = arg(user, 2, "training", user.kwargs.get("train", True))
        if training is False or p == 0:
            return _Step("pass")
        return _Step("pass", problem=f"dropout in training mode (p={p}) on the attention "
                                     f"weights")
    if first is cur and (MATMUL.matches(user) or BMM.matches(user)):
        v = user.args[1] if len(user.args) > 1 else user.kwargs.get("other",
                                                                     user.kwargs.get("mat2"))
        if not isinstance(v, fx.Node):
            return None
        return _Step("pv", v=v, layout={4: "bhsd", 3: "bhsd-flattened"}.get(ndim(v) or 0))
    if EINSUM.matches(user):
        return _classify_einsum_pv(user, cur)
    return None


def _classify_scores(user: fx.Node, cur: fx.Node, ctx: Context) -> _Step | None:
    first = user.args[0] if user.args else None
    if first is cur and SOFTMAX.matches(user):
        rank = ndim(cur) or 0
        dim = arg(user, 1, "dim", None)
        if norm_dim(dim, rank) != rank - 1:
            return _Step("softmax", problem=f"softmax over dim {dim} of the {rank}-D scores, "
                                            f"not over the keys (the last dim)")
        return _Step("softmax")
    scaled = _scalar_step(user, cur, ctx)
    if scaled is not None:
        return _Step("scale", factor=scaled)
    if MUL.matches(user) and cur in user.args[:2]:
        return _Step("scale", problem="the scores are multiplied by a tensor computed at run "
                                      "time (a learned scale or a multiplicative mask)")
    if ADD.matches(user) and cur in user.args[:2] and len(user.args) == 2:
        other = user.args[1] if user.args[0] is cur else user.args[0]
        if number(user.kwargs.get("alpha", 1)) != 1:
            return None
        if isinstance(other, fx.Node) and tensor_meta(other) is not None:
            return _Step("mask", mask=other, mask_kind="additive")
        if number(other) is not None:
            return _Step("pass")  # softmax is shift-invariant
        return None
    if first is cur and MASKED_FILL.matches(user):
        mask, fill = arg(user, 1, "mask", None), arg(user, 2, "value", None)
        if not isinstance(mask, fx.Node):
            return None
        fill_value = scalar(fill, ctx.folder)
        if not is_large_negative(fill_value):
            return _Step("mask", mask=mask, mask_kind="block",
                         problem=f"masked_fill with {fill_value} (not -inf or a large negative)")
        return _Step("mask", mask=mask, mask_kind="block")
    if WHERE.matches(user) and len(user.args) == 3 and isinstance(user.args[0], fx.Node):
        cond, x, y = user.args
        if x is cur and is_large_negative(scalar(y, ctx.folder)):
            return _Step("mask", mask=cond, mask_kind="allow")
        if y is cur and is_large_negative(scalar(x, ctx.folder)):
            return _Step("mask", mask=cond, mask_kind="block")
    return None


def _classify_einsum_pv(user: fx.Node, probs: fx.Node) -> _Step | None:
    """``einsum("bhqk,bhkd->bhqd", p, v)``; the output layout is checked against q's later."""
    parsed = einsum_operands(user)
    if parsed is None or len(parsed[0]) != 2 or probs not in parsed[2]:
        return None
    subs, out, operands = parsed
    pi = 0 if operands[0] is probs else 1
    sp, sv, v = subs[pi], subs[1 - pi], operands[1 - pi]
    if len(sp) < 3 or not isinstance(v, fx.Node):
        return None
    batch, i, j = sp[:-2], sp[-2], sp[-1]
    new = [c for c in sv if c not in sp]
    if len(new) != 1 or j in out:
        return None
    e = new[0]
    v_layout, out_layout = einsum_layout(sv, batch, j, e), einsum_layout(out, batch, i, e)
    if v_layout in (None, "transposed") or v_layout != out_layout:
        return _Step("pv", v=v, problem=f"einsum {user.args[0]!r}: unsupported layout of v or "
                                        f"of the output")
    return _Step("pv", v=v, layout=v_layout)


def _finish_walk(ctx: Context, form: str, product: fx.Node, inputs: _ScoreInputs,
                 w: _Walk) -> Found:
    assert w.pv is not None and w.v is not None
    problems = list(w.problems)
    site = {n for n, _ in w.chain} | {w.pv} | w.in_place
    for n in inputs.aux:  # ordered from the product outward
        if all(u in site for u in n.users):
            site.add(n)
    if inputs.problem:
        problems.insert(0, inputs.problem)
    for n, phase in w.chain:
        outside = [u for u in n.users if u not in site]
        if outside:
            what = "attention scores (before softmax)" if phase == "scores" else \
                "attention weights"
            names = ", ".join(u.name for u in outside)
            returned = " are also returned" if any(u.op == "output" for u in outside) else \
                " are also used outside the site"
            problems.append(f"{what}{returned} (used by {len(outside)} node(s) outside the "
                            f"site: {names})")
            break
    layout = inputs.layout
    if layout is not None and w.pv_layout is not None and w.pv_layout != layout:
        problems.append(f"v and the output are {w.pv_layout} while q is {layout}")
    nodes = [n for n in product.graph.nodes if n in site]
    if inputs.k is None or layout is None:
        return _reject(form, w.softmax or product, problems, tuple(nodes))
    return _build(form, ctx, anchor=w.softmax or product, q=inputs.q, k=inputs.k, v=w.v,
                  output=w.pv, layout=layout, nodes=nodes, scale=w.scale, mask=w.mask,
                  mask_kind=w.mask_kind, sdpa_causal=False, problems=problems,
                  score_views=w.score_views, mask_before_scale=w.mask_before_scale,
                  mask_target=w.mask_target)


# --------------------------------------------------------------------------------------------
# Building the result


def _build(form: str, ctx: Context, *, anchor: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node,
           output: fx.Node, layout: str, nodes: list[fx.Node], scale: _Scale,
           mask: fx.Node | None, mask_kind: str | None, sdpa_causal: bool,
           problems: list[str], score_views: list[tuple[Any, ...]] | None = None,
           mask_before_scale: bool = False, mask_target: tuple[Any, ...] | None = None
           ) -> Found:
    """Shapes, GQA, mask facts and module path; a Rejected when anything is wrong."""
    problems = list(problems)
    scale_value, scale_node, scale_problem = scale.resolve()
    if scale_problem:
        problems.append(scale_problem)
    dims = _layout_dims(layout, q, k, v)
    if isinstance(dims, str):
        problems.append(dims)
        return _reject(form, anchor, problems, tuple(nodes))
    batch, heads, q_len, head_dim, kv_heads, kv_len, v_head_dim, flat = dims
    k_compact = v_compact = None
    repeat_nodes: tuple[fx.Node, ...] = ()
    if layout == "bhsd-flattened":
        found = heads_of_flattened(flat, q_len, head_dim, [q, k, v], output, score_views or [])
        if found is None:
            problems.append("the heads are flattened into the batch ([B*H, S, D]) and their "
                            "number cannot be recovered from the reshapes around the site")
        else:
            batch, heads = found
            kv_heads = heads
    elif layout == "bhsd":
        rk, rv = unrepeat_kv(k), unrepeat_kv(v)
        if rk is not None and rv is not None:
            (k_compact, k_rep), (v_compact, v_rep) = rk, rv
            kv_heads = shape(k_compact)[1]  # type: ignore[index]
            repeat_nodes = k_rep + v_rep
    if isinstance(heads, int) and isinstance(kv_heads, int) and \
            (kv_heads == 0 or heads % kv_heads):
        problems.append(f"{heads} query heads cannot share {kv_heads} key/value heads")
    facts = MaskFacts()
    if mask is not None:
        if mask_target is None:
            mask_target = (batch, heads, q_len, kv_len) if layout != "bhsd-flattened" else \
                (flat, q_len, kv_len)
        bad_shape = check_mask_shape(mask, mask_target)
        if bad_shape:
            problems.append(bad_shape)
        else:
            facts = mask_facts(mask, mask_kind, q_len, kv_len, ctx.folder)
            if facts.attn_mask is not None and facts.window is None:
                split, why = key_padding_facts(mask, mask_kind, mask_target, q_len, kv_len,
                                               ctx.folder)
                facts = split if split is not None else \
                    replace(facts, note=f"{facts.note}; not a key-padding mask: {why}")
            if mask_before_scale and not facts.recognized:
                problems.append("the additive mask is added before the scores are scaled, so "
                                "it is scaled too; that is only safe for a 0/-inf mask and this "
                                "one is not known at compile time")
    is_causal = sdpa_causal or facts.is_causal
    if sdpa_causal and lengths_differ(q_len, kv_len):
        problems.append(f"is_causal=True with q_len {q_len} != kv_len {kv_len}: SDPA aligns "
                        f"that mask top-left, spcompile's causal is bottom-right")
    if problems:
        return _reject(form, anchor, problems, tuple(nodes))
    path, type_name = module_of(anchor)
    return AttentionSite(
        form=form, q=q, k=k, v=v, output=output, nodes=tuple(nodes), layout=layout,
        batch=batch, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        v_head_dim=v_head_dim, q_len=q_len, kv_len=kv_len,
        scale=scale_value, scale_node=scale_node, is_causal=is_causal,
        attn_mask=facts.attn_mask, mask_kind=facts.kind if facts.attn_mask is not None else None,
        mask_window=facts.window, mask_note=facts.note, key_padding=facts.key_padding,
        key_padding_kind=facts.key_padding_kind, dropout_p=0.0,
        k_compact=k_compact, v_compact=v_compact, kv_repeat_nodes=repeat_nodes,
        module_path=path, module_type=type_name, layer=layer_index(path))


def _layout_dims(layout: str, q: fx.Node, k: fx.Node, v: fx.Node) -> tuple[Any, ...] | str:
    """(batch, heads, q_len, head_dim, kv_heads, kv_len, v_head_dim, flattened batch*heads)
    or why the shapes do not fit ``layout``."""
    sq, sk, sv = shape(q), shape(k), shape(v)
    rank = {"bhsd": 4, "bshd": 4, "bhsd-flattened": 3}[layout]
    if any(s is None or len(s) != rank for s in (sq, sk, sv)):
        return (f"q, k, v shapes {[list(s) if s else None for s in (sq, sk, sv)]} do not fit the "
                f"{layout} layout")
    assert sq is not None and sk is not None and sv is not None
    if layout == "bhsd-flattened":
        (bh, q_len, d), (_, kv_len, dk), (_, kv_len_v, dv) = sq, sk, sv
        batch = heads = kv_heads = None
        if differ(sq[0], sk[0]) or differ(sq[0], sv[0]):
            return "q, k and v have different flattened batch*heads"
    else:
        order = (0, 1, 2, 3) if layout == "bhsd" else (0, 2, 1, 3)
        batch, heads, q_len, d = (sq[i] for i in order)
        _, kv_heads, kv_len, dk = (sk[i] for i in order)
        _, v_heads, kv_len_v, dv = (sv[i] for i in order)
        bh = None
        if differ(kv_heads, v_heads):
            return f"k has {kv_heads} heads but v has {v_heads}"
    if differ(d, dk):
        return f"q and k have different head dims ({d} and {dk})"
    if differ(kv_len, kv_len_v):
        return f"k and v have different lengths ({kv_len} and {kv_len_v})"
    return batch, heads, q_len, d, kv_heads, kv_len, dv, bh


def _reject(form: str, anchor: fx.Node, problems: list[str], nodes: tuple[fx.Node, ...]
            ) -> Rejected:
    reasons = list(dict.fromkeys(p for p in problems if p))
    path, type_name = module_of(anchor)
    return Rejected(form=form, reason="; ".join(reasons) or "unsupported", node=anchor,
                    module_path=path, module_type=type_name, layer=layer_index(path),
                    nodes=nodes)


FORMS: tuple[Form, ...] = (
    Form("sdpa", SDPA, match_sdpa, "F.scaled_dot_product_attention"),
    Form("matmul", MATMUL, match_matmul, "softmax(q @ k^T * s + mask) @ v with matmul / @"),
    Form("bmm", BMM, match_bmm, "the same with torch.bmm on [B*H, S, D]"),
    Form("baddbmm", BADDBMM, match_baddbmm, "baddbmm(mask or empty, q, k^T, alpha=s) scores"),
    Form("einsum", EINSUM, match_einsum, "einsum scores and einsum / matmul output"),
    Form("opaque", OPAQUE_ATTENTION, match_opaque,
         "nn.MultiheadAttention / TransformerEncoderLayer calls: always rejected, with why"),
)
"""Detection forms in priority order; the first whose anchor matches a node and whose matcher
returns non-None wins that node."""
