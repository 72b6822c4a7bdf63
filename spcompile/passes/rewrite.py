"""Rewrite detected attention sites to the ``spcompile::attention`` op, rule by rule.

For each site found by :func:`spcompile.passes.detect.find_attention`: match the spec's rules
(first match wins), combine the site's own causality with the pattern (AND, never dropped), and
replace the site's nodes by one op call. Every site that stays dense gets its reason in the
report; with ``strict`` that is an error instead.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any

import torch
from torch import fx

from ..spec.errors import SpecError
from ..spec.patterns import AnyOf, Dense, Pattern, PerHead, Sliding, TopK
from ..spec.rules import SiteKey
from .detect import find_attention
from .report import Report, SiteReport, log_report, set_last_report

log = logging.getLogger("spcompile")


class LeftDenseError(RuntimeError):
    """Raised in strict mode when a site cannot be rewritten."""


def _concrete(value: Any) -> int | None:
    """An int from an int or a SymInt, else None.

    ``int()`` on a SymInt guards on its value, so a graph compiled with dynamic shapes is
    specialized to the lengths it was rewritten for. That keeps length-dependent rules
    (``min_seq_len``, grid volumes, expressions of ``seq_len``) exact; the price is one compile
    per length. Guarding only on the conditions the matched rule reads would remove it.
    """
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _shape_text(site: Any) -> str:
    heads = f"{site.num_heads}" if site.num_kv_heads in (None, site.num_heads) else \
        f"{site.num_heads}/{site.num_kv_heads}"
    return f"{site.batch}x{heads}x{site.q_len}x{site.kv_len}x{site.head_dim}"


def _with_causal(pattern: Pattern) -> Pattern:
    return AnyOf(pattern, causal=True)


def _device_of(node: fx.Node) -> torch.device:
    value = node.meta.get("example_value", node.meta.get("val"))
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


def choose(site: Any, spec: Any) -> tuple[Pattern | None, str | None, str | None]:
    """(pattern, rule label, reason left dense) for one site."""
    if spec is None:
        return None, None, "no spec given (options['spec'] or SPCOMPILE_SPEC)"
    q_len, kv_len = _concrete(site.q_len), _concrete(site.kv_len)
    key = SiteKey(module_path=site.module_path or "", layer=site.layer, seq_len=q_len,
                  kv_len=kv_len, num_heads=site.num_heads, head_dim=site.head_dim)
    try:
        match = spec.match(key)
    except SpecError as e:  # a rule matched but its pattern does not fit this site
        return None, None, e.problems[0].message
    if match is None:
        return None, None, "no rule matched"
    rule, pattern = match
    label = rule.label
    if isinstance(pattern, Dense):
        return None, label, "the rule says dense"
    if isinstance(pattern, TopK):
        return None, label, "TopK has no kernel yet"
    if site.attn_mask is not None:
        window_mask = Sliding(window=site.mask_window, causal=True) if site.mask_window else None
        if window_mask is None or pattern != window_mask:
            note = f" ({site.mask_note})" if getattr(site, "mask_note", None) else ""
            return None, label, ("the site has its own attention mask" + note
                                 + ", which cannot be combined with the pattern yet")
        # The model's own causal window is exactly the rule's pattern: the mask is redundant.
    if site.dropout_p:
        return None, label, f"attention dropout p={site.dropout_p} is active"
    if isinstance(pattern, PerHead) and site.num_heads is not None:
        try:
            pattern.resolve(site.num_heads)
        except ValueError as e:
            return None, label, str(e)
    if q_len is not None and kv_len is not None:
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
    """(density, predicted speedup) for the report; a failure is logged, never raised (the
    report must not break compilation)."""
    q_len, kv_len = _concrete(site.q_len), _concrete(site.kv_len)
    if q_len is None or kv_len is None or isinstance(pattern, PerHead):
        return None, None
    from ..plan.tiles import allowed_pairs

    density = allowed_pairs(pattern, q_len, kv_len) / (q_len * kv_len)
    try:
        from ..sim import simulate

        report = simulate(pattern, q_len, kv_len, heads=int(site.num_heads or 1),
                          head_dim=int(site.head_dim or 64))
        return density, report.predicted_speedup
    except Exception as e:
        log.warning("spcompile: no simulator prediction for %s: %s", site.module_path, e)
        return density, None


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
                                       predicted_speedup=speedup))
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
    import dataclasses

    return dataclasses.replace(site, q=q)


def _replace(gm: fx.GraphModule, site: Any, pattern: Pattern) -> None:
    """Insert the op before the site's output, in the site's own layout, and reroute users."""
    graph = gm.graph
    k = site.k_compact if site.k_compact is not None else site.k
    v = site.v_compact if site.v_compact is not None else site.v
    scale = site.scale if site.scale is not None else 1.0 / math.sqrt(site.head_dim)
    impl = "triton" if _device_of(site.q).type == "cuda" else "torch"
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
            heads = int(site.num_heads)
            kv_heads = int(site.num_kv_heads) if site.k_compact is not None else heads
            q = graph.call_method("unflatten", (site.q, 0, (-1, heads)))
            k = graph.call_method("unflatten", (k, 0, (-1, kv_heads)))
            v = graph.call_method("unflatten", (v, 0, (-1, kv_heads)))
        else:
            q = site.q
        call = graph.call_function(torch.ops.spcompile.attention.default,
                                   (q, k, v, pattern.key, float(scale), impl, [], []))
        out = graph.call_function(operator.getitem, (call, 0))
        if site.layout == "bshd":
            out = graph.call_method("transpose", (out, 1, 2))
        elif site.layout == "bhsd-flattened":
            out = graph.call_method("flatten", (out, 0, 1))
    out.meta.update(site.output.meta)
    site.output.replace_all_uses_with(out)
