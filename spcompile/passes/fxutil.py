"""Reading dynamo's torch-level FX graphs: which op a node is, its arguments, shapes, constants.

Dynamo records the Python-level call, not an aten op: ``q @ k`` is ``operator.matmul``,
``torch.matmul(q, k)`` is ``torch.matmul`` and ``q.matmul(k)`` is a ``call_method`` node named
``"matmul"``. :class:`Op` groups all spellings of one operation so that matchers ask one
question (``MATMUL.matches(node)``) instead of listing targets. Only ``torch.fx`` APIs that are
stable since torch 2.5 are used.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

_MISSING = object()


@dataclass(frozen=True)
class Op:
    """All spellings of one operation in a dynamo graph: callables and ``Tensor`` method names."""

    name: str
    functions: frozenset[Any] = frozenset()
    methods: frozenset[str] = frozenset()

    def matches(self, node: fx.Node) -> bool:
        if node.op == "call_function":
            try:
                return node.target in self.functions
            except TypeError:  # unhashable target
                return False
        return node.op == "call_method" and node.target in self.methods


def _op(name: str, functions: Iterable[Any] = (), methods: Iterable[str] = ()) -> Op:
    return Op(name, frozenset(f for f in functions if f is not None), frozenset(methods))


def _aten(name: str) -> list[Any]:
    """``torch.ops.aten.<name>`` and its default overload, where they exist (dynamo in torch
    2.14 records ``k.mT`` as ``aten.mT``)."""
    packet = getattr(torch.ops.aten, name, None)
    return [packet, getattr(packet, "default", None)] if packet is not None else []


MATMUL = _op("matmul", [torch.matmul, operator.matmul, torch.Tensor.matmul],
             ["matmul", "__matmul__"])
BMM = _op("bmm", [torch.bmm, torch.Tensor.bmm], ["bmm"])
BADDBMM = _op("baddbmm", [torch.baddbmm, torch.Tensor.baddbmm], ["baddbmm"])
EINSUM = _op("einsum", [torch.einsum, getattr(torch.functional, "einsum", None)])
SOFTMAX = _op("softmax", [F.softmax, torch.softmax, torch.special.softmax, torch.Tensor.softmax],
              ["softmax"])
SDPA = _op("scaled_dot_product_attention", [F.scaled_dot_product_attention,
                                            torch._C._nn.scaled_dot_product_attention])
OPAQUE_ATTENTION = _op("opaque attention", [
    F.multi_head_attention_forward,  # nn.MultiheadAttention
    getattr(torch, "_native_multi_head_attention", None),  # its inference fast path
    getattr(torch, "_transformer_encoder_layer_fwd", None),  # nn.TransformerEncoderLayer's
])
TRANSPOSE = _op("transpose", [torch.transpose, torch.swapaxes, torch.swapdims,
                              torch.Tensor.transpose],
                ["transpose", "swapaxes", "swapdims"])
PERMUTE = _op("permute", [torch.permute, torch.Tensor.permute], ["permute"])
MATRIX_T = _op("mT", _aten("mT"), ["mT"])  # and getattr(k, "mT"): see is_attribute
# In-place spellings count too: ``x *= s`` is ``operator.imul`` (dynamo rebinds ``x`` to it),
# ``x.mul_(s)`` a method whose result dynamo does not use (see detect._is_in_place).
MUL = _op("mul", [operator.mul, operator.imul, torch.mul, torch.multiply],
          ["mul", "mul_", "multiply", "__mul__", "__rmul__"])
DIV = _op("div", [operator.truediv, operator.itruediv, torch.div, torch.true_divide,
                  torch.divide], ["div", "div_", "divide", "true_divide", "__truediv__"])
ADD = _op("add", [operator.add, operator.iadd, torch.add], ["add", "add_", "__add__",
                                                            "__radd__"])
MASKED_FILL = _op("masked_fill", [torch.masked_fill], ["masked_fill", "masked_fill_"])
WHERE = _op("where", [torch.where], ["where"])
DROPOUT = _op("dropout", [F.dropout, torch.dropout], ["dropout"])
CAST = _op("cast", [], ["to", "float", "half", "bfloat16", "double", "type", "type_as"])
IDENTITY = _op("identity", [torch.clone], ["contiguous", "clone"])
VIEW = _op("view", [torch.reshape, torch.flatten, torch.unflatten],
           ["view", "reshape", "flatten", "unflatten"])
EXPAND = _op("expand", [], ["expand"])
BROADCAST = _op("broadcast", [torch.broadcast_to], ["expand", "expand_as", "broadcast_to"])
LOGICAL_AND = _op("and", [operator.and_, operator.iand, torch.logical_and, torch.bitwise_and],
                  ["logical_and", "bitwise_and", "__and__", "__rand__"])
UNSQUEEZE = _op("unsqueeze", [torch.unsqueeze], ["unsqueeze"])
GETITEM = _op("getitem", [operator.getitem])
REPEAT_INTERLEAVE = _op("repeat_interleave", [torch.repeat_interleave], ["repeat_interleave"])

# Ops whose result is random; a subgraph containing one is never constant-folded.
_RANDOM_NAMES = frozenset({
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm",
    "bernoulli", "bernoulli_", "normal", "normal_", "uniform_", "random_", "exponential_",
    "multinomial", "dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout",
    "empty", "empty_like", "empty_strided", "new_empty",  # uninitialised memory
})


def is_attribute(node: fx.Node, name: str) -> bool:
    """``x.<name>`` read as an attribute: dynamo in torch 2.11 records ``k.mT`` as
    ``getattr(k, "mT")``, torch 2.14 as ``aten.mT`` (see :data:`MATRIX_T`)."""
    return node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
        and node.args[1] == name


def arg(node: fx.Node, index: int, name: str | None = None, default: Any = _MISSING) -> Any:
    """Argument ``index`` (counting the tensor / ``self`` as 0) or keyword ``name``."""
    if index < len(node.args):
        return node.args[index]
    if name is not None and name in node.kwargs:
        return node.kwargs[name]
    if default is _MISSING:
        raise KeyError(f"{node.format_node()} has no argument {index} ({name})")
    return default


def varargs(node: fx.Node, start: int) -> tuple[Any, ...]:
    """``x.view(2, 3)`` and ``x.view((2, 3))`` both as ``(2, 3)``."""
    rest = tuple(node.args[start:])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return tuple(rest[0])
    return rest


def value(node: Any) -> Any:
    """The example value dynamo recorded for a node (a FakeTensor, SymInt, ...), else None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def tensor_meta(node: Any) -> torch.Tensor | None:
    v = value(node)
    return v if isinstance(v, torch.Tensor) else None


def shape(node: Any) -> tuple[Any, ...] | None:
    """The node's shape, ints or SymInts, or None when it is not a tensor."""
    t = tensor_meta(node)
    return tuple(t.shape) if t is not None else None


def ndim(node: Any) -> int | None:
    s = shape(node)
    return len(s) if s is not None else None


def concrete_int(x: Any) -> int | None:
    """An int when ``x`` is a plain int (not a symbolic size), else None."""
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def same_size(a: Any, b: Any) -> bool:
    """True when two sizes are provably equal: equal ints or the same symbolic expression.

    Never calls ``bool()`` on a SymBool, which would add a guard to a graph that dynamo has
    already finished tracing.
    """
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(_expr(a) == _expr(b))  # structural comparison of sympy expressions
    except Exception:
        return False


def _expr(x: Any) -> Any:
    return x.node.expr if isinstance(x, torch.SymInt) else x


def differ(a: Any, b: Any) -> bool:
    """True only when two sizes are provably different (two different ints)."""
    return isinstance(a, int) and isinstance(b, int) and a != b


def lengths_differ(a: Any, b: Any) -> bool:
    """True when two sizes differ, guarding on their comparison when one is a SymInt.

    For decisions whose meaning changes with the answer (SDPA's ``is_causal`` is aligned
    top-left when q_len != kv_len, spcompile's causal bottom-right): under dynamic shapes a
    query and key length may be two symbols, so :func:`differ` (ints only) cannot tell.
    ``bool()`` of the SymBool installs a guard on ``a == b`` only; a later call on the other
    side of it recompiles. Sizes that are neither ints nor SymInts (unknown) never differ.
    """
    if not all(isinstance(x, (int, torch.SymInt)) for x in (a, b)) or same_size(a, b):
        return differ(a, b)
    return not bool(a == b)


def norm_dim(dim: Any, rank: int) -> int | None:
    if not isinstance(dim, int) or isinstance(dim, bool) or not -rank <= dim < rank:
        return None
    return dim % rank


def describe(node: fx.Node) -> str:
    """A short name for an op in messages: ``tanh``, ``Tensor.masked_fill``, ``output``."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op if node.op == "output" else f"{node.op} {node.target}"


def number(x: Any) -> float | None:
    """A Python number (not bool) as float, else None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


# --------------------------------------------------------------------------------------------
# Constant folding of small input-free subgraphs (masks built from arange, 0-d scale tensors)


class Folder:
    """Evaluates subgraphs that depend on no graph input, with a per-node size limit.

    HuggingFace builds its causal mask inside the compiled graph from ``arange`` and
    comparisons; evaluating that subgraph tells whether the mask is exactly causal. Results are
    cached per node because every layer shares one mask. ``max_elements`` bounds the cost:
    the biggest intermediate may hold at most that many elements (2**24 = one 4096 x 4096 mask),
    beyond that the mask is kept as it is.
    """

    def __init__(self, gm: fx.GraphModule, max_elements: int) -> None:
        self.gm = gm
        self.max_elements = max_elements
        self._cache: dict[fx.Node, tuple[Any, str | None]] = {}

    def fold(self, node: fx.Node) -> tuple[Any, str | None]:
        """(value, None) or (None, why it cannot be folded)."""
        if node not in self._cache:
            self._cache[node] = self._fold(node)
        return self._cache[node]

    def _fold(self, node: fx.Node) -> tuple[Any, str | None]:
        order: list[fx.Node] = []
        seen: set[fx.Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder":
                return None, "depends on graph inputs"
            if n.op not in ("call_function", "call_method", "get_attr"):
                return None, f"contains a {n.op} node"
            name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
            if name in _RANDOM_NAMES:
                return None, f"contains a random op ({name})"
            t = tensor_meta(n)
            if t is not None:
                numel = t.numel()
                if not isinstance(numel, int):
                    return None, "has symbolic sizes"
                if numel > self.max_elements:
                    return None, (f"too large to evaluate at compile time ({numel} elements > "
                                  f"{self.max_elements})")
            order.append(n)
            stack.extend(n.all_input_nodes)
        env: dict[fx.Node, Any] = {}
        try:
            with torch.no_grad(), _no_fake_mode():
                for n in sorted(order, key=_position(node.graph)):
                    env[n] = self._run(n, env)
        except Exception as e:  # any failure only means "not foldable"
            return None, f"could not be evaluated ({type(e).__name__}: {e})"
        result = env[node]
        if isinstance(result, torch.Tensor) and result.is_meta:
            return None, "has no values (meta tensors)"
        return result, None

    def _run(self, n: fx.Node, env: dict[fx.Node, Any]) -> Any:
        if n.op == "get_attr":
            obj: Any = self.gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj
        args = fx.node.map_aggregate(fx.node.map_arg(n.args, lambda a: env[a]), _off_meta)
        kwargs = fx.node.map_aggregate(fx.node.map_arg(n.kwargs, lambda a: env[a]), _off_meta)
        if n.op == "call_method":
            self_arg, *rest = args
            return getattr(self_arg, str(n.target))(*rest, **kwargs)
        fn: Callable[..., Any] = n.target  # type: ignore[assignment]
        return fn(*args, **kwargs)


def _off_meta(x: Any) -> Any:
    """Fold on the CPU what the graph builds on the meta device (``spcompile inspect`` traces
    models on meta): a mask made from ``arange`` has the same values wherever it is built."""
    if isinstance(x, torch.device) and x.type == "meta":
        return torch.device("cpu")
    if isinstance(x, str) and x == "meta":
        return "cpu"
    return x


def _position(graph: fx.Graph) -> Callable[[fx.Node], int]:
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index[n]


class _no_fake_mode:
    """Leave any active FakeTensorMode while folding, so that real tensors come out."""

    def __enter__(self) -> None:
        self._ctx = None
        try:
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            self._ctx = unset_fake_temporarily()
            self._ctx.__enter__()
        except ImportError:  # pragma: no cover - very old torch
            self._ctx = None

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def scalar(x: Any, folder: Folder) -> float | None:
    """A Python number, or a node that folds to a one-element tensor / number, as float."""
    n = number(x)
    if n is not None:
        return n
    if not isinstance(x, fx.Node):
        return None
    v = value(x)
    if number(v) is not None:
        return float(v)
    if isinstance(v, (torch.SymFloat, torch.SymInt)):
        expr = v.node.expr
        return float(expr) if getattr(expr, "is_number", False) else None
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        folded, _ = folder.fold(x)
        if isinstance(folded, torch.Tensor) and folded.numel() == 1:
            return float(folded.item())
        if number(folded) is not None:
            return float(folded)
    return None


def runtime_scalar(x: Any) -> float | None:
    """The capture-time value of a node that is a number only known at run time.

    Under ``torch.compile(dynamic=True)`` dynamo turns float module attributes (HuggingFace's
    ``self.scaling``, timm's ``self.scale``) into graph inputs read with ``.item()``: a SymFloat
    whose hint is the value it had when the graph was captured.
    """
    v = value(x)
    if not isinstance(v, (torch.SymFloat, torch.SymInt)):
        return None
    if getattr(v.node.expr, "is_number", False):
        return None  # a constant: scalar() reads it
    hint = getattr(v.node, "hint", None)
    return float(hint) if number(hint) is not None else None


def is_large_negative(x: float | None) -> bool:
    """Mask fill values: -inf, any dtype's finfo.min, or another value whose exp underflows to
    exactly 0 next to a real score (exp(-1e4) is 0 even in float64)."""
    return x is not None and (x == -math.inf or x <= -1e4)
