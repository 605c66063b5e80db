"""Tensor, the autograd graph and the backward pass.

A Tensor wraps one backend array (``.data``). An op is a ``Function`` (see
``ops/``): its ``forward`` computes on arrays and keeps what ``backward`` will
need on the Function object; ``Function.apply`` wraps the result in a Tensor
that remembers the Function (``_ctx``) when a gradient is wanted. The Tensor
operators and methods (``+``, ``@``, ``.sum()``...) are declared in the class
below; each calls the ``tinytensor.functional`` function it names (``+`` is
``F.add``), except the comparisons, which are plain array ops without a graph.

>>> import numpy as np, tinytensor as tt
>>> x = tt.tensor(np.array([1.0, 2.0]), requires_grad=True)
>>> (x * x).sum().backward()
>>> x.grad
array([2., 4.])
"""
from __future__ import annotations

import contextlib
import operator
import re
import threading

import numpy as np

from . import backend, memory

DEFAULT_DTYPE = np.float32

# -- grad mode ----------------------------------------------------------------
_state = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def no_grad():
    """Within this block ops record no graph (sampling, evaluation)."""
    previous = is_grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = previous


@contextlib.contextmanager
def enable_grad():
    previous = is_grad_enabled()
    _state.grad_enabled = True
    try:
        yield
    finally:
        _state.grad_enabled = previous


# -- primitives -----------------------------------------------------------------
PRIMITIVES: dict[str, type] = {}  # the one registry: name -> Function subclass


def register(cls):
    """Class decorator: add a primitive to the registry (once per name)."""
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()  # MatMul -> mat_mul
    if name in PRIMITIVES:
        raise RuntimeError(f"primitive {name!r} registered twice")
    PRIMITIVES[name] = cls
    cls.name = name
    return cls


class Function:
    """One differentiable primitive: ``forward`` on arrays, ``backward`` on arrays.

    Subclasses define ``forward(self, *arrays, **attrs) -> array`` and
    ``backward(self, grad) -> tuple`` (one gradient, or None, per array input).
    Whatever backward needs is stored on ``self`` during forward.
    """

    name = "function"

    def __init__(self):
        self.parents: tuple = ()
        self.needs_grad: tuple = ()

    def forward(self, *arrays, **attrs):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, grad):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **attrs) -> "Tensor":
        arrays = [t.data for t in inputs]
        if len(arrays) > 1:
            _check_same_backend(cls.name, arrays)
        fn = cls()
        needs_grad = tuple(t.requires_grad for t in inputs)
        record = is_grad_enabled() and any(needs_grad)
        fn.needs_grad = needs_grad
        try:
            out = fn.forward(*arrays, **attrs)
        except (ValueError, IndexError, TypeError) as exc:
            shapes = ", ".join(f"{tuple(a.shape)} {a.dtype}" for a in arrays)
            raise type(exc)(f"{cls.name}: {exc} (inputs: {shapes})") from None
        # an integer/bool result (a cast to int) carries no gradient, as in PyTorch
        record = record and _is_float(out.dtype)
        result = Tensor._wrap(out, requires_grad=record)
        if record:
            fn.parents = inputs
            result._ctx = fn
        return result


def _check_same_backend(op, arrays):
    first = type(arrays[0])
    for a in arrays[1:]:
        if type(a) is not first and backend.name_of(a) != backend.name_of(arrays[0]):
            names = ", ".join(backend.name_of(x) for x in arrays)
            raise backend.BackendError(
                f"{op}: inputs live on different backends ({names}); move them with .to(backend) first"
            )


# -- Tensor -------------------------------------------------------------------------
def _is_float(dtype) -> bool:
    # ml_dtypes' bfloat16 (mixed precision on NumPy) is a void-kind dtype, not a np.floating subtype
    return np.issubdtype(dtype, np.floating) or np.dtype(dtype).name == "bfloat16"


class _DeferredFunctional:
    """Stands in for ``tinytensor.functional`` until a Tensor operator first needs it.

    functional (and the ops under it) import this module, so this module cannot
    import functional at its top. The first attribute looked up here imports it
    and puts the module itself in ``F``'s place: from then on ``F.add`` in the
    Tensor operators is a plain module-attribute lookup, with nothing deferred left.
    """

    def __getattr__(self, name):
        global F
        from . import functional
        F = functional
        return getattr(functional, name)


F = _DeferredFunctional()  # tinytensor.functional, from the first Tensor operator on


def _comparison(op):
    """A Tensor comparison: a bool tensor outside the graph (no gradient), as in PyTorch.

    ``op`` is the ``operator`` function, so the array's own method runs (NumPy's or CuPy's);
    a host array or list on the other side is moved to this tensor's backend first, as
    arithmetic lifts it (CuPy refuses a NumPy array in an operator)."""
    def compare(self, other):
        if isinstance(other, Tensor):
            other = other.data
        elif isinstance(other, (np.ndarray, list, tuple)):
            other = self.xp.asarray(other)
        return Tensor._wrap(op(self.data, other))
    return compare


def _functional_method(name):
    """A Tensor method that is ``tinytensor.functional.<name>`` with the tensor first."""
    def method(self, *args, **kwargs):
        return getattr(F, name)(self, *args, **kwargs)
    method.__name__, method.__qualname__ = name, f"Tensor.{name}"
    method.__doc__ = f"``tinytensor.functional.{name}`` with this tensor first."
    return method


class Tensor:
    """An n-dimensional array with reverse-mode autodiff.

    Create one with ``tt.tensor(array_or_list, requires_grad=...)``. NumPy arrays
    keep their dtype; Python floats become float32 (as in PyTorch).
    """

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "__weakref__", "_name")
    # array + Tensor hands over to Tensor.__radd__ (and so on): NumPy and CuPy both skip an
    # operand whose __array_ufunc__ is None. (A priority alone is not enough: CuPy's is also 100.)
    __array_ufunc__ = None
    __array_priority__ = 100

    def __init__(self, data, requires_grad: bool = False, dtype=None, backend_name: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        if not hasattr(data, "dtype"):
            # Python scalars and lists: floats become float32, ints int64, bools bool; on the host
            # first, so the rule holds whatever backend they then move to
            data = np.asarray(data)
            if dtype is None and _is_float(data.dtype):
                dtype = DEFAULT_DTYPE
        if backend_name is not None and backend.name_of(data) != backend_name:
            data = backend.to_backend(data, backend_name)  # (an unknown name raises BackendError here)
        if dtype is not None and data.dtype != dtype:
            data = data.astype(dtype)
        self.data = data
        self.grad = None
        self._ctx = None
        self._name = None
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    @classmethod
    def _wrap(cls, data, requires_grad=False) -> "Tensor":
        t = cls.__new__(cls)
        t.data, t.grad, t._ctx, t._name, t.requires_grad = data, None, None, None, requires_grad
        return t

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        if flag and not _is_float(self.data.dtype):
            raise TypeError(
                f"only floating-point tensors can require grad, got dtype {self.data.dtype} "
                f"(shape {tuple(self.shape)}); cast with .float() first"
            )
        self.requires_grad = flag
        return self

    # -- properties ------------------------------------------------------------
    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: int(self.data.size))
    backend = property(lambda self: backend.name_of(self.data))
    is_leaf = property(lambda self: self._ctx is None)
    T = property(lambda self: self.transpose(-1, -2) if self.ndim >= 2 else self)

    @property
    def xp(self):
        return backend.xp_of(self.data)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.numpy()!r}{grad})"

    def numpy(self) -> np.ndarray:
        return backend.to_numpy(self.data)

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> "Tensor":
        return Tensor._wrap(self.data)

    def to(self, backend_name: str) -> "Tensor":
        return Tensor._wrap(backend.to_backend(self.data, backend_name), self.requires_grad)

    def float(self) -> "Tensor":
        return self.astype(DEFAULT_DTYPE)

    def astype(self, dtype) -> "Tensor":
        return F.cast(self, dtype)

    # -- operators and methods ----------------------------------------------------
    # Each calls the tinytensor.functional function named in it, with this tensor
    # first; a number on either side of an arithmetic operator is lifted to this
    # tensor's dtype and backend. The operators are written out because they are
    # the hot path: a def that calls F.add costs ~40 ns on top of F.add itself.
    def __add__(self, other):
        return F.add(self, other)

    __radd__ = __add__

    def __mul__(self, other):
        return F.mul(self, other)

    __rmul__ = __mul__

    def __sub__(self, other):
        return F.sub(self, other)

    def __rsub__(self, other):
        return F.sub(F._lift(other, self), self)

    def __truediv__(self, other):
        return F.div(self, other)

    def __rtruediv__(self, other):
        return F.div(F._lift(other, self), self)

    def __pow__(self, exponent):
        return F.pow(self, exponent)

    def __rpow__(self, base):
        return F.pow(F._lift(base, self), self)

    def __matmul__(self, other):
        return F.matmul(self, other)

    def __rmatmul__(self, other):
        return F.matmul(F._lift(other, self), self)

    def __neg__(self):
        return F.neg(self)

    def __getitem__(self, index):
        return F.getitem(self, index)

    __lt__ = _comparison(operator.lt)
    __le__ = _comparison(operator.le)
    __gt__ = _comparison(operator.gt)
    __ge__ = _comparison(operator.ge)
    __eq__ = _comparison(operator.eq)
    __ne__ = _comparison(operator.ne)
    __hash__ = object.__hash__  # tensors stay usable as dict keys despite __eq__

    # methods, with F's arguments: x.sum(axis=0) is F.sum(x, axis=0), and so on
    sum = _functional_method("sum")
    mean = _functional_method("mean")
    max = _functional_method("max")
    var = _functional_method("var")
    reshape = view = _functional_method("reshape")
    permute = _functional_method("permute")
    transpose = _functional_method("transpose")
    split = _functional_method("split")
    matmul = _functional_method("matmul")
    exp = _functional_method("exp")
    log = _functional_method("log")
    sqrt = _functional_method("sqrt")
    tanh = _functional_method("tanh")
    sigmoid = _functional_method("sigmoid")
    relu = _functional_method("relu")
    softmax = _functional_method("softmax")
    log_softmax = _functional_method("log_softmax")

    # -- autograd ---------------------------------------------------------------
    def backward(self, grad=None) -> None:
        """Backpropagate from this tensor, accumulating into leaves' ``.grad``.

        The walk is iterative (deep graphs are fine) and frees the graph behind
        it: each Function drops its saved arrays and links once used, so a
        second ``backward`` through the same graph raises.
        """
        if not self.requires_grad:
            raise RuntimeError("backward(): this tensor does not require grad (no input had requires_grad=True, or it was made under no_grad)")
        xp = self.xp
        if xp is np:  # training on the host: keep freed memory mapped from now on (tinytensor.memory)
            memory.on_first_backward()
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a scalar (one element), got shape {self.shape}; "
                    "pass grad= of the same shape, or reduce with .sum()/.mean() first"
                )
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if tuple(grad.shape) != self.shape:
                raise ValueError(f"backward(): grad shape {tuple(grad.shape)} != tensor shape {self.shape}")

        order = _topological_order(self)
        grads = {id(self): grad}
        for node in order:  # from the output back to the leaves
            g = grads.pop(id(node), None)
            if g is None:
                continue
            fn = node._ctx
            if fn is None:  # a leaf: accumulate
                _accumulate(node, g)
                continue
            if fn.parents is None:
                raise RuntimeError("backward() through a graph that was already freed; compute the forward again")
            in_grads = fn.backward(g)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            for parent, needs, pg in zip(fn.parents, fn.needs_grad, in_grads):
                if not needs or pg is None:
                    continue
                key = id(parent)
                prev = grads.get(key)
                # never add in place: a backward may hand the same array to two parents
                grads[key] = pg if prev is None else prev + pg
            # free the graph: the Function and the arrays it saved go; the marker
            # left behind makes a second backward through this graph an error
            node._ctx = _FREED

    def zero_grad(self):
        self.grad = None


_FREED = Function()  # stands in for a Function whose graph backward() already freed
_FREED.parents = None


def _topological_order(root: Tensor) -> list:
    """Nodes reachable from root, each after every node that consumes it."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        fn = node._ctx
        if fn is not None and fn.parents:
            for parent, needs in zip(fn.parents, fn.needs_grad):
                if needs and id(parent) not in visited:
                    stack.append((parent, False))
    order.reverse()
    return order


def _accumulate(leaf: Tensor, g) -> None:
    if not leaf.requires_grad:
        return
    if g.dtype != leaf.data.dtype:
        g = g.astype(leaf.data.dtype)
    if leaf.grad is None:
        xp = backend.xp_of(g)
        leaf.grad = xp.array(g, copy=True)  # own it: g may alias another array
    else:
        leaf.grad += g


# -- creation ---------------------------------------------------------------------
def tensor(data, requires_grad: bool = False, dtype=None, backend: str | None = None) -> Tensor:
    """Make a Tensor from an array, list or scalar. NumPy arrays keep their dtype."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, backend_name=backend)


def _make(fill, shape, dtype, requires_grad, backend_name):
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    from . import backend as _b
    xp = _b.get_xp(backend_name or "numpy")
    return Tensor(fill(xp, tuple(shape), np.dtype(dtype or DEFAULT_DTYPE)), requires_grad=requires_grad)


def zeros(*shape, dtype=None, requires_grad=False, backend=None) -> Tensor:
    return _make(lambda xp, s, d: xp.zeros(s, d), shape, dtype, requires_grad, backend)


def ones(*shape, dtype=None, requires_grad=False, backend=None) -> Tensor:
    return _make(lambda xp, s, d: xp.ones(s, d), shape, dtype, requires_grad, backend)


def full(shape, value, dtype=None, requires_grad=False, backend=None) -> Tensor:
    return _make(lambda xp, s, d: xp.full(s, value, d), (shape,), dtype, requires_grad, backend)


def randn(*shape, dtype=None, requires_grad=False, backend=None) -> Tensor:
    from . import backend as _b

    def fill(xp, s, d):
        return xp.asarray(_b.rng().standard_normal(s), dtype=d)
    return _make(fill, shape, dtype, requires_grad, backend)


def rand(*shape, dtype=None, requires_grad=False, backend=None) -> Tensor:
    from . import backend as _b

    def fill(xp, s, d):
        return xp.asarray(_b.rng().random(s), dtype=d)
    return _make(fill, shape, dtype, requires_grad, backend)


def arange(*args, dtype=None, backend=None) -> Tensor:
    from . import backend as _b
    xp = _b.get_xp(backend or "numpy")
    return Tensor(xp.arange(*args, dtype=dtype or np.int64))
