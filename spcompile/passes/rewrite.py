"""Rewrite detected attention sites to the ``spcompile::attention`` op, rule by rule.

For each site found by :func:`spcompile.passes.detect.find_attention`: match the spec's rules
(first match wins), combine the site's own causality and key padding with the pattern (AND,
never dropped), and replace the site's nodes by one op call (one per run of heads for PerHead;
:mod:`.padding` for key padding). Every site that stays dense gets its reason in the report;
with ``strict`` that is an error instead.

Under ``torch.compile(dynamic=True)`` lengths are SymInts and the rewrite guards only on what
its decisions read (see :func:`_specialize`): 1-D patterns serve every length from one graph.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import Any

import torch
from torch import fx

from ..spec.errors import SpecError
from ..spec.patterns import (
    AnyOf,
    Blocked,
    BlockLayout,
    Dense,
    Global,
    Pattern,
    PerHead,
    Sliding,
    Strided,
    TopK,
)
from ..spec.rules import Rule, SiteKey, Spec
from .detect import find_attention
from .opcall import site_attention
from .padding import padded_sparse_attention
from .report import Report, SiteReport, log_report, set_last_report

log = logging.getLogger("spcompile")


class LeftDenseError(RuntimeError):
    """Raised in strict mode when a site cannot be rewritten."""


def _hint(value: Any) -> int | None:
    """The value of an int or SymInt at capture time, without a guard (None when unknown).

    For reports and predictions only: a decision that changes the graph must not read it,
    since a later call with another length would reuse that graph without a check.
    """
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        hint = getattr(value.node, "hint", None)
        return int(hint) if hint is not None else None
    return None


def _specialize(value: Any) -> int | None:
    """An int from an int or a SymInt (None when neither), guarding on the SymInt's value.

    ``int()`` on a SymInt installs a guard ``s == value``: the compiled graph is then valid for
    that value only, and another value recompiles. The rewrite does that only where the result
    really depends on the value: a pattern whose validity needs the lengths (a Neighborhood's
    grid volume, an explicit block layout, TopK), a rule whose pattern is an expression of the
    site's sizes, the head count of a ``[B*H, S, D]`` site, and the head dim of a default scale.
    Rule conditions (``min_seq_len``/``max_seq_len``) guard on their comparisons instead (see
    :func:`_first_rule`), and 1-D patterns get the symbolic lengths through to the op, which
    builds its plan from the run-time shapes: one graph serves every length.
    """
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return int(value)
    return None


def _needs_lengths(pattern: Pattern) -> bool:
    """True when the pattern is only valid, or only means something, at given lengths.

    Sliding, Blocked, Global, Strided and block layouts built from their parameters (DeepSpeed
    kinds) are defined for every length: the op builds their plan from the run-time shapes, so
    the rewrite needs no concrete length. Neighborhood rules need length == grid volume, an
    explicit layout a fixed number of blocks, TopK q_len == kv_len. Any other kind: assume it
    does (specializing is always correct, only slower to compile).
    """
    if isinstance(pattern, AnyOf):
        return any(_needs_lengths(p) for p in pattern.patterns)
    if isinstance(pattern, PerHead):
        return any(_needs_lengths(p) for _, p in pattern.groups)
    if isinstance(pattern, BlockLayout):
        return pattern.layout is not None
    return not isinstance(pattern, (Dense, Sliding, Blocked, Global, Strided))


def _first_rule(spec: Spec, key: SiteKey) -> Rule | None:
    """The first rule whose condition holds for ``key`` (lengths may be SymInts).

    ``min_seq_len``/``max_seq_len`` compare a SymInt with ``>=``/``<=`` and take ``bool()`` of
    the result: that guards the comparison (e.g. ``s0 >= 4096``), not the value, so lengths on
    the same side of every threshold share one graph and a length that crosses one recompiles
    and matches again. A rule with ``grid`` guards length == volume: such rules specialize.
    """
    for rule in spec.rules:
        if rule.mismatch(key) is None:
            return rule
    return None


def _shape_text(site: Any) -> str:
    heads = f"{site.num_heads}" if site.num_kv_heads in (None, site.num_heads) else \
        f"{site.num_heads}/{site.num_kv_heads}"
    return f"{site.batch}x{heads}x{site.q_len}x{site.kv_len}x{site.head_dim}"


def _with_causal(pattern: Pattern) -> Pattern:
    """The site's causality ANDed with the pattern. TopK selects among causal blocks only
    (``causal=True``), so its whole budget lands where the site can attend."""
    if isinstance(pattern, TopK):
        return dataclasses.replace(pattern, causal=True)
    return AnyOf(pattern, causal=True)


def _device_of(node: fx.Node) -> torch.device:
    value = node.meta.get("example_value", node.meta.get("val"))
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


def _impl(site: Any) -> str:
    """The op's ``impl`` for a site: the Triton kernels on CUDA, the blockwise path elsewhere."""
    return "triton" if _device_of(site.q).type == "cuda" else "torch"


def choose(site: Any, spec: Any) -> tuple[Pattern | None, str | None, str | None]:
    """(pattern, rule label, reason left dense) for one site.

    Under dynamic shapes the site's lengths are SymInts; see :func:`_specialize` for which
    decisions guard on what.
    """
    if spec is None:
        return None, None, "no spec given (options['spec'] or SPCOMPILE_SPEC)"
    key = SiteKey(module_path=site.module_path or "", layer=site.layer, seq_len=site.q_len,
                  kv_len=site.kv_len, num_heads=_hint(site.num_heads),
                  head_dim=_hint(site.head_dim))
    try:
        rule = _first_rule(spec, key)
    except Exception as e:  # e.g. a guard on a length that has no value at compile time
        return None, None, f"the site's lengths cannot be compared with the rules ({e})"
    if rule is None:
        return None, None, "no rule matched"
    label = rule.label
    template = rule.static_pattern
    q_len: Any = site.q_len
    kv_len: Any = site.kv_len
    if template is None or _needs_lengths(template):
        # The pattern is an expression of the sizes, or only valid at some lengths: resolve
        # and check it at this site's lengths, and compile for these lengths only.
        q_len, kv_len = _specialize(site.q_len), _specialize(site.kv_len)
        concrete = SiteKey(module_path=key.module_path, layer=site.layer, seq_len=q_len,
                           kv_len=kv_len, num_heads=_specialize(site.num_heads),
                           head_dim=_specialize(site.head_dim))
        try:
            pattern = rule.pattern_for(concrete)
        except SpecError as e:  # the rule matched but its pattern does not fit this site
            return None, label, e.problems[0].message
    else:
        pattern = template
    if isinstance(pattern, Dense):
        return None, label, "the rule says dense"
    if site.attn_mask is not None:
        if site.mask_window:
            # The model's own causal window (AND any key padding) is only redundant when it
            # is exactly the rule's pattern.
            if pattern != Sliding(window=site.mask_window, causal=True):
                return None, label, (f"the site's own mask is a causal window of "
                                     f"{site.mask_window} keys ({site.mask_note}), which cannot "
                                     f"be combined with another pattern yet")
        elif site.key_padding is None:
            note = f" ({site.mask_note})" if site.mask_note else ""
            return None, label, ("the site has its own attention mask" + note
                                 + ", which cannot be combined with the pattern yet")
        # Otherwise the mask is key padding (AND is_causal): applied with the pattern.
    if site.key_padding is not None:
        if not pattern.static or (isinstance(pattern, PerHead)
                                  and not all(p.static for _, p in pattern.groups)):
            return None, label, (f"key padding with a {pattern.kind} pattern: its block scores "
                                 "would pool the padded keys")
        if site.scale_node is None and site.scale is not None and not site.scale > 0:
            return None, label, (f"key padding with scale {site.scale} <= 0: the kernels add "
                                 "the padding as bias / scale")
    if site.dropout_p:
        return None, label, f"attention dropout p={site.dropout_p} is active"
    if (isinstance(pattern, TopK) and _impl(site) == "triton"
            and (pattern.block < 16 or pattern.block & (pattern.block - 1))):
        return None, label, (f"TopK block {pattern.block}: the Triton kernels need a power of "
                             "two >= 16 (their tiles are the blocks)")
    if isinstance(pattern, PerHead) and site.num_heads is not None:
        try:
            pattern.resolve(_specialize(site.num_heads) or 0)
        except ValueError as e:
            return None, label, str(e)
    if isinstance(q_len, int) and isinstance(kv_len, int):
        try:
            pattern.check_lengths(q_len, kv_len)
        except (ValueError, NotImplementedError) as e:
            return None, label, str(e)
    if site.is_causal:
        if isinstance(pattern, PerHead):
            pattern = PerHead([(s, _with_causal(p)) for s, p in pattern.groups])
        else:
            pattern = _with_causal(pattern)
    return pattern, label, None


def _predict(pattern: Pattern, site: Any) -> tuple[float | None, float | None]:
    """(density, predicted speedup) for the report, at the lengths seen at capture time under
    dynamic shapes; a failure is logged, never raised (the report must not break
    compilation)."""
    q_len, kv_len = _hint(site.q_len), _hint(site.kv_len)
    if q_len is None or kv_len is None:
        return None, None
    try:
        from ..sim import simulate

        report = simulate(pattern, q_len, kv_len, heads=_hint(site.num_heads) or 1,
                          head_dim=_hint(site.head_dim) or 64)
        # The simulator's FLOP bound is S^2 / allowed pairs: exact for static patterns, the
        # expected selection for TopK, the mean over heads for PerHead.
        return 1.0 / report.flop_bound, report.predicted_speedup
    except Exception as e:
        log.warning("spcompile: no simulator prediction for %s: %s", site.module_path, e)
        return None, None


def rewrite_attention(gm: fx.GraphModule, opts: Any) -> Report:
    """Rewrite ``gm`` in place; returns (and records) the report."""
    from .. import ops  # noqa: F401  (registers torch.ops.spcompile.*)

    sites, rejected = find_attention(gm)
    report = Report()
    matched_rules: set[str] = set()
    for site in sites:
        pattern, rule, reason = choose(site, opts.spec)
        if rule is not None:
            matched_rules.add(rule)
        if pattern is None:
            report.sites.append(SiteReport(site.module_path or "", site.form, _shape_text(site),
                                           rule=rule, reason=reason))
            continue
        _replace(gm, site, pattern)
        density, speedup = _predict(pattern, site)
        report.sites.append(SiteReport(site.module_path or "", site.form, _shape_text(site),
                                       rule=rule, pattern=pattern.key, density=density,
                                       predicted_speedup=speedup,
                                       key_padding=site.key_padding is not None))
    for cand in rejected:
        report.candidates_rejected.append(SiteReport(cand.module_path or "", cand.form, "?",
                                                     reason=cand.reason))
    if opts.spec is not None:
        report.unused_rules = [r.label for r in opts.spec.rules if r.label not in matched_rules]
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    set_last_report(report)
    if opts.report:
        log_report(report)
    if opts.strict and report.left_dense:
        first = report.left_dense[0]
        raise LeftDenseError(f"spcompile (strict): {len(report.left_dense)} attention site(s) "
                             f"left dense, e.g. {first.module_path or '?'}: {first.reason}")
    return report


def _with_q(site: Any, q: fx.Node) -> Any:
    return dataclasses.replace(site, q=q)


def _replace(gm: fx.GraphModule, site: Any, pattern: Pattern) -> None:
    """Insert the op before the site's output, in the site's own layout, and reroute users."""
    graph = gm.graph
    k = site.k_compact if site.k_compact is not None else site.k
    v = site.v_compact if site.v_compact is not None else site.v
    scale = site.scale if site.scale is not None else \
        1.0 / math.sqrt(_specialize(site.head_dim) or 1)
    impl = _impl(site)
    scale_node = getattr(site, "scale_node", None)
    with graph.inserting_before(site.output):
        if scale_node is not None:
            # The scale is a run-time value (dynamo lifted it under dynamic=True): apply it to
            # q in the graph and give the op 1.0, so no capture-time value is baked in.
            q_scaled = graph.call_function(operator.mul, (site.q, scale_node))
            site = _with_q(site, q_scaled)
            scale = 1.0
        if site.layout == "bshd":
            q, k, v = (graph.call_method("transpose", (x, 1, 2)) for x in (site.q, k, v))
        elif site.layout == "bhsd-flattened":
            # [B*H, S, D] -> [B, H, S, D]; only the head counts are needed (lengths may be
            # symbolic).
            heads = _specialize(site.num_heads)
            kv_heads = _specialize(site.num_kv_heads) if site.k_compact is not None else heads
            q = graph.call_method("unflatten", (site.q, 0, (-1, heads)))
            k = graph.call_method("unflatten", (k, 0, (-1, kv_heads)))
            v = graph.call_method("unflatten", (v, 0, (-1, kv_heads)))
        else:
            q = site.q
        if site.key_padding is not None:
            out = graph.call_function(padded_sparse_attention,
                                      (q, k, v, site.key_padding, site.key_padding_kind,
                                       pattern.key, float(scale), impl))
        else:
            # Static single patterns are one op call; PerHead and TopK go through
            # site_attention (one call per run of heads; the selection op before TopK's).
            if isinstance(pattern, (PerHead, TopK)):
                call = graph.call_function(site_attention,
                                           (q, k, v, pattern.key, float(scale), impl))
            else:
                call = graph.call_function(torch.ops.spcompile.attention.default,
                                           (q, k, v, pattern.key, float(scale), impl, [], []))
            out = graph.call_function(operator.getitem, (call, 0))
        if site.layout == "bshd":
            out = graph.call_method("transpose", (out, 1, 2))
        elif site.layout == "bhsd-flattened":
            out = graph.call_method("flatten", (out, 0, 1))
    out.meta.update(site.output.meta)
    site.output.replace_all_uses_with(out)
