"""A strict CPU stand-in for CuPy: the "cupy" backend runs, held to CuPy's rules, without a GPU.

``conftest.py`` installs it as the ``cupy`` (and ``cupyx``) module when no real CuPy with a
GPU imports, so every backend-parametrized test and the ``--backend cupy`` program tests run
on it; with a real CuPy the real one is used and this module is not installed.

What it enforces (a TypeError, as CuPy raises, unless said otherwise):
- A separate array type, ``ndarray``, wrapping a NumPy array. ``np.asarray(a)`` and
  ``np.array(a)`` fail (``__array__`` raises CuPy's message): a device array reaches the
  host only through ``.get()`` / ``cupy.asnumpy``.
- No NumPy array in an operator or a CuPy function: ``a + np.ones(3)``, ``np.ones(3) + a``,
  ``cupy.where(host_mask, a, 0)``, ``a[...] = host_array``. Python and NumPy scalars are fine,
  as are host index arrays and ``cupy.asarray(host_array)`` (copied, as a transfer is).
- No NumPy function on a device array: ``np.add.at(a, ...)``, ``np.exp(a)``,
  ``np.concatenate([a])``. Stricter than CuPy, which dispatches some of these through
  ``__array_ufunc__``/``__array_function__``; tinytensor's rule is ``xp.*`` only.
  (A NumPy scalar on the left of an operator, ``np.float32(2) * a``, works as in CuPy.)
- Only functions CuPy has: the module offers the part of cupy's namespace this project
  uses (each name exists in CuPy 13 and 14); anything else is an AttributeError. Its
  ``random.RandomState``, like CuPy's, can be re-seeded but its state not read.
- CuPy's results: reductions and integer indexing give 0-d device arrays, not scalars;
  integer index arrays wrap around instead of raising (CuPy checks no bounds, so only
  tinytensor's own checks catch an out-of-range token id); ``cupy_array + obj`` hands over
  to ``obj.__radd__`` exactly when CuPy does (``obj.__array_ufunc__ is None``, or no
  ``__array_ufunc__`` and a higher ``__array_priority__``).
- It counts device-to-host synchronisations: ``.get()``, ``asnumpy``, ``float``/``int``/
  ``bool``/``complex``, ``.item()``, ``.tolist()``, ``repr``/``str``/``format``, boolean-mask
  indexing (the result's size must be read back) and ``nonzero``. ``count_syncs()`` records
  them with the line that caused each.
- ``failing_kernels(exc)`` makes every operation that would compile or launch a kernel
  raise ``exc``, as a broken CUDA toolkit (NVRTC missing) does.

What it cannot show: it is NumPy on the CPU. No kernels (beyond the injected failure), no
streams or asynchrony (every op completes at once, so no race shows), no memory pool
(out-of-memory, fragmentation), no speed, no GPU rounding (cuBLAS, atomics, reduction
order), not cuRAND's numbers (draws come from NumPy's generator), no CuPy-only API
(ElementwiseKernel, fuse, streams), and nothing about the driver or the toolkit's versions.

>>> import cupy_standin as cs
>>> a = cs.cupy.arange(3)
>>> with cs.count_syncs() as syncs:
...     total = float(a.sum())
>>> total, syncs.n
(3.0, 1)
"""
from __future__ import annotations

import contextlib
import numbers
import os
import sys
import types

import numpy as np

_MISSING = object()
_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")

# -- synchronisations and injected kernel failures -------------------------------------------------------
total_syncs = 0  # since import, every kind
_recorders: list = []
_kernel_failure = None


class SyncLog:
    """The device-to-host reads seen inside ``count_syncs()``: ``events`` is a list of
    ``(kind, "file:line")`` (the first frame outside this file), ``n`` their number."""

    def __init__(self):
        self.events = []

    @property
    def n(self) -> int:
        return len(self.events)

    def __repr__(self):
        return f"{self.n} syncs: " + "; ".join(f"{kind} at {where}" for kind, where in self.events)


@contextlib.contextmanager
def count_syncs():
    log = SyncLog()
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)


def _sync(kind: str) -> None:
    global total_syncs
    total_syncs += 1
    if _recorders:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename == __file__:
            frame = frame.f_back
        where = "?" if frame is None else (f"{os.path.relpath(frame.f_code.co_filename)}:{frame.f_lineno} "
                                           f"({frame.f_code.co_name})")
        for log in _recorders:
            log.events.append((kind, where))


@contextlib.contextmanager
def failing_kernels(exc: BaseException):
    """Every kernel launch (compiled on first use by NVRTC in CuPy) raises ``exc`` meanwhile."""
    global _kernel_failure
    previous, _kernel_failure = _kernel_failure, exc
    try:
        yield
    finally:
        _kernel_failure = previous


def _launch() -> None:
    if _kernel_failure is not None:
        raise _kernel_failure


# -- conversions at the edge of the device -----------------------------------------------------------------
def _is_scalar(x) -> bool:
    return isinstance(x, (numbers.Number, np.generic)) and not isinstance(x, np.ndarray)


def _wrap(x):
    """NumPy results as device arrays (0-d included, as CuPy returns them)."""
    if isinstance(x, np.ndarray):
        return ndarray(x)
    if isinstance(x, np.generic):
        return ndarray(np.asarray(x))
    if isinstance(x, (tuple, list)):
        return type(x)(_wrap(v) for v in x)
    return x


def _unwrap(x, where: str):
    """Device arrays to their NumPy data; a host array is refused (CuPy: no implicit transfers)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}: {where} takes cupy arrays, not NumPy ones; "
                        "move it with cupy.asarray() first")
    if isinstance(x, (tuple, list)):
        return type(x)(_unwrap(v, where) for v in x)
    return x


def _index(index, shape, what: str):
    """An index for the wrapped array: device arrays unwrapped, lists made arrays, integer
    arrays wrapped around their axis (CuPy checks no bounds), and an Ellipsis added so a
    full integer index gives a 0-d view, as in CuPy. Boolean masks cost a sync."""
    items = [i._a if isinstance(i, ndarray) else np.asarray(i) if isinstance(i, list) else i
             for i in (index if isinstance(index, tuple) else (index,))]
    consumed = sum(i.ndim if isinstance(i, np.ndarray) and i.dtype == bool else 1
                   for i in items if i is not None and i is not Ellipsis)
    out, axis = [], 0
    for item in items:
        if item is Ellipsis:
            axis += len(shape) - consumed
        elif isinstance(item, np.ndarray) and item.dtype == bool:
            _sync(f"boolean-mask {what}")
            axis += item.ndim
        elif isinstance(item, np.ndarray):
            if item.dtype.kind not in "iu":
                raise IndexError(f"arrays used as indices must be of integer or boolean type (actual: {item.dtype})")
            if axis < len(shape) and shape[axis]:
                item = np.mod(item, shape[axis])
            axis += 1
        elif item is not None:
            axis += 1
        out.append(item)
    if not any(i is Ellipsis for i in out):
        out.append(Ellipsis)
    return tuple(out)


# -- the array -------------------------------------------------------------------------------------------
def _binary(ufunc, reflected=False, in_place=False):
    def method(self, other):
        if isinstance(other, ndarray):
            other = other._a
        elif not _is_scalar(other):
            if isinstance(other, np.ndarray):
                raise TypeError(f"Unsupported type {type(other)}: a NumPy array in an operator with a cupy array; "
                                "move it with cupy.asarray() first")
            # CuPy's _should_use_rop: hand over to the other operand's reflected method when it
            # opts out of ufuncs, or has no __array_ufunc__ and a higher __array_priority__
            opt = getattr(other, "__array_ufunc__", _MISSING)
            if opt is None or (opt is _MISSING and getattr(other, "__array_priority__", 0) > self.__array_priority__):
                return NotImplemented
            if ufunc in (np.equal, np.not_equal):
                return NotImplemented
            raise TypeError(f"Unsupported type {type(other)}")
        _launch()
        if in_place:
            ufunc(self._a, other, out=self._a)
            return self
        return _wrap(ufunc(other, self._a) if reflected else ufunc(self._a, other))
    return method


def _unary(ufunc):
    def method(self):
        _launch()
        return _wrap(ufunc(self._a))
    return method


def _reading(kind, convert):
    def method(self, *args):
        _sync(kind)
        return convert(self._a, *args)
    return method


def _array_method(name, kernel=True):
    def method(self, *args, **kwargs):
        if kernel:
            _launch()
        args, kwargs = _unwrap(args, f"ndarray.{name}"), {k: _unwrap(v, f"ndarray.{name}") for k, v in kwargs.items()}
        return _wrap(getattr(self._a, name)(*args, **kwargs))
    method.__name__ = name
    return method


def _shape_method(name):
    """reshape/transpose: shapes and axes may be host integers or integer arrays."""
    def method(self, *args):
        args = tuple(tuple(int(v) for v in a) if isinstance(a, (np.ndarray, list, tuple)) else a for a in args)
        return ndarray(getattr(self._a, name)(*args))
    method.__name__ = name
    return method


class ndarray:
    """A device array (a NumPy array inside). Make one with ``cupy.asarray`` and friends."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100  # CuPy's
    __hash__ = None

    def __init__(self, data):
        if not isinstance(data, np.ndarray):
            raise TypeError("the stand-in's ndarray wraps a NumPy array; use cupy.asarray() to make one")
        self._a = data

    # -- what CuPy refuses ------------------------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method == "__call__" and len(inputs) == 2 and not kwargs and any(_is_scalar(x) for x in inputs):
            # np.float32(2) * a: NumPy's scalar hands the operator over; CuPy computes it on the device
            a, b = (x._a if isinstance(x, ndarray) else x for x in inputs)
            _launch()
            return _wrap(ufunc(a, b))
        name = ufunc.__name__ + ("" if method == "__call__" else f".{method}")
        raise TypeError(f"numpy.{name} called on a cupy array: NumPy functions do not run on the GPU "
                        f"(the stand-in refuses even those CuPy would dispatch); call cupy.{ufunc.__name__} "
                        "through the array module (tinytensor.backend.xp_of), or cupyx.scatter_add for add.at")

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} called on a cupy array: NumPy functions do not run on the GPU "
                        f"(the stand-in refuses even those CuPy would dispatch); call cupy.{func.__name__} "
                        "through the array module (tinytensor.backend.xp_of)")

    # -- attributes -----------------------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))
    device = property(lambda self: cuda.Device(0))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._a)))

    # -- reading back to the host: each one a synchronisation --------------------------------------------
    def get(self, stream=None, order="C", out=None, blocking=True):
        _sync("get()")
        return np.array(self._a, order=order, copy=True)

    __float__ = _reading("float()", float)
    __int__ = _reading("int()", int)
    __complex__ = _reading("complex()", complex)
    item = _reading("item()", np.ndarray.item)
    tolist = _reading("tolist()", np.ndarray.tolist)
    __repr__ = _reading("repr()", repr)
    __str__ = _reading("str()", str)
    __format__ = _reading("format()", format)

    def __bool__(self):
        if self._a.size > 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous. "
                             "Use a.any() or a.all()")
        _sync("bool()")
        return bool(self._a.size and self._a.reshape(-1)[0])

    # -- indexing ----------------------------------------------------------------------------------------------
    def __getitem__(self, index):
        index = _index(index, self._a.shape, "index")
        _launch()
        return ndarray(self._a[index])

    def __setitem__(self, index, value):
        index = _index(index, self._a.shape, "assignment")
        if isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, np.ndarray) and value.ndim > 0 or isinstance(value, (list, tuple)):
            raise TypeError(f"Unsupported type {type(value)}: assigning a host array into a cupy array; "
                            "move it with cupy.asarray() first")
        _launch()
        self._a[index] = value

    # -- operators ---------------------------------------------------------------------------------------------
    __add__, __radd__, __iadd__ = _binary(np.add), _binary(np.add, True), _binary(np.add, in_place=True)
    __sub__, __rsub__, __isub__ = (_binary(np.subtract), _binary(np.subtract, True),
                                   _binary(np.subtract, in_place=True))
    __mul__, __rmul__, __imul__ = (_binary(np.multiply), _binary(np.multiply, True),
                                   _binary(np.multiply, in_place=True))
    __truediv__, __rtruediv__, __itruediv__ = (_binary(np.true_divide), _binary(np.true_divide, True),
                                               _binary(np.true_divide, in_place=True))
    __floordiv__, __rfloordiv__ = _binary(np.floor_divide), _binary(np.floor_divide, True)
    __mod__, __rmod__ = _binary(np.remainder), _binary(np.remainder, True)
    __pow__, __rpow__, __ipow__ = _binary(np.power), _binary(np.power, True), _binary(np.power, in_place=True)
    __matmul__, __rmatmul__ = _binary(np.matmul), _binary(np.matmul, True)
    __and__, __rand__, __iand__ = (_binary(np.bitwise_and), _binary(np.bitwise_and, True),
                                   _binary(np.bitwise_and, in_place=True))
    __or__, __ror__, __ior__ = (_binary(np.bitwise_or), _binary(np.bitwise_or, True),
                                _binary(np.bitwise_or, in_place=True))
    __xor__, __rxor__ = _binary(np.bitwise_xor), _binary(np.bitwise_xor, True)
    __lt__, __le__, __gt__, __ge__ = _binary(np.less), _binary(np.less_equal), _binary(np.greater), \
        _binary(np.greater_equal)
    __eq__, __ne__ = _binary(np.equal), _binary(np.not_equal)
    __neg__, __pos__, __abs__, __invert__ = _unary(np.negative), _unary(np.positive), _unary(np.absolute), \
        _unary(np.invert)

    # -- methods (those of cupy.ndarray that the project uses) -----------------------------------------------
    reshape, transpose = _shape_method("reshape"), _shape_method("transpose")
    swapaxes, ravel, squeeze = _array_method("swapaxes", False), _array_method("ravel"), _array_method("squeeze")
    copy, fill, flatten = _array_method("copy"), _array_method("fill"), _array_method("flatten")
    sum, mean, prod, max, min = (_array_method("sum"), _array_method("mean"), _array_method("prod"),
                                 _array_method("max"), _array_method("min"))
    argmax, argmin, any, all = _array_method("argmax"), _array_method("argmin"), _array_method("any"), \
        _array_method("all")
    cumsum, clip, dot, var = _array_method("cumsum"), _array_method("clip"), _array_method("dot"), \
        _array_method("var")

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        out = self._a.astype(dtype, copy=copy)
        if out is self._a:
            return self
        _launch()
        return ndarray(out)

    def view(self, dtype=None):
        return ndarray(self._a.view() if dtype is None else self._a.view(dtype))

    def nonzero(self):
        _sync("nonzero()")  # the number of results is read back
        return _wrap(self._a.nonzero())


# -- the module's functions ---------------------------------------------------------------------------------
def _function(name, np_func=None, kernel=True):
    np_func = np_func or getattr(np, name)

    def function(*args, **kwargs):
        where = f"cupy.{name}"
        out = kwargs.get("out")
        args = _unwrap(args, where)
        kwargs = {k: _unwrap(v, where) for k, v in kwargs.items()}
        if kernel:
            _launch()
        result = np_func(*args, **kwargs)
        return out if isinstance(out, ndarray) else _wrap(result)
    function.__name__ = function.__qualname__ = name
    return function


def asarray(a, dtype=None, order=None):
    """Device arrays pass through (cast if asked); anything else is copied to the device."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
    return ndarray(np.array(_unwrap_host(a), dtype=dtype, copy=True))


def array(obj, dtype=None, copy=True, order="K", ndmin=0):
    if isinstance(obj, ndarray):
        _launch()
        return ndarray(np.array(obj._a, dtype=dtype, copy=copy, ndmin=ndmin))
    return ndarray(np.array(_unwrap_host(obj), dtype=dtype, copy=True, ndmin=ndmin))


def _unwrap_host(obj):
    if isinstance(obj, (list, tuple)) and any(isinstance(v, ndarray) for v in obj):
        raise TypeError("the stand-in does not build an array from a list of cupy arrays; use cupy.stack")
    return obj


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def get_array_module(*args):
    return cupy if any(isinstance(a, ndarray) for a in args) else np


def split(ary, indices_or_sections, axis=0):
    if isinstance(indices_or_sections, np.ndarray):  # CuPy reads split points from a host array
        indices_or_sections = indices_or_sections.tolist()
    return _wrap(np.split(_unwrap(ary, "cupy.split"), indices_or_sections, axis))


def take_along_axis(arr, indices, axis):
    arr, indices = _unwrap(arr, "cupy.take_along_axis"), _unwrap(indices, "cupy.take_along_axis")
    _launch()
    if axis is not None and arr.shape[axis]:
        indices = np.mod(indices, arr.shape[axis])  # no bounds check in CuPy
    return _wrap(np.take_along_axis(arr, indices, axis))


def _reading_function(name):
    def function(a, *args, **kwargs):
        _sync(f"cupy.{name}()")
        return _wrap(getattr(np, name)(_unwrap(a, f"cupy.{name}"), *args, **kwargs))
    function.__name__ = name
    return function


# cuRAND's generator kinds (cupy.cuda.curand.CURAND_RNG_PSEUDO_*), as curand.h numbers them
_CURAND = dict(CURAND_RNG_PSEUDO_DEFAULT=100, CURAND_RNG_PSEUDO_XORWOW=101, CURAND_RNG_PSEUDO_MRG32K3A=121,
               CURAND_RNG_PSEUDO_MTGP32=141, CURAND_RNG_PSEUDO_MT19937=142, CURAND_RNG_PSEUDO_PHILOX4_32_10=161)


class RandomState:
    """cupy.random.RandomState's ``seed`` and ``random_sample``, on NumPy's Philox (not cuRAND's
    numbers). As in CuPy, its state cannot be read: only re-seeded."""

    def __init__(self, seed=None, method=None):
        if method is not None and method not in _CURAND.values():
            raise ValueError(f"unknown cuRAND generator {method!r}")
        self.method = method
        self.seed(seed)

    def seed(self, seed=None):
        if seed is not None and not 0 <= int(seed) < 2**64:
            raise ValueError("Seed must be an integer between 0 and 2**64 - 1")
        self._np = np.random.Generator(np.random.Philox(seed))

    def random_sample(self, size=None, dtype=float):
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise TypeError(f"cupy.random only supports float32 and float64, got {dtype}")
        _launch()
        return ndarray(np.asarray(self._np.random(size, dtype=dtype)))


# -- the modules: cupy, cupy.random, cupy.cuda, cupyx ---------------------------------------------------------
class CompileException(Exception):
    """As cupy.cuda.compiler.CompileException."""


class CUDARuntimeError(RuntimeError):
    """As cupy_backends.cuda.api.runtime.CUDARuntimeError."""


class _Device:
    def __init__(self, device=0):
        self.id = int(device)

    def synchronize(self):
        _sync("Device.synchronize()")

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    compute_capability = "90"


cuda = types.SimpleNamespace(
    Device=_Device,
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, CUDARuntimeError=CUDARuntimeError,
                                  deviceSynchronize=lambda: _sync("deviceSynchronize()")),
    compiler=types.SimpleNamespace(CompileException=CompileException),
    curand=types.SimpleNamespace(**_CURAND),
    get_device_id=lambda: 0,
    is_available=lambda: True,
)

# functions and ufuncs: each name exists in CuPy 13 and 14 with NumPy's signature
_FUNCTIONS = ("zeros_like empty_like ones_like full_like full ones concatenate stack where einsum vdot matmul dot "
              "argsort sort broadcast_to exp log log1p expm1 sqrt tanh sin cos square power negative absolute abs "
              "sign maximum minimum clip add subtract multiply divide true_divide floor_divide reciprocal equal "
              "not_equal less less_equal greater greater_equal logical_and logical_or logical_not isfinite isnan "
              "isinf sum prod mean var max min amax amin argmax argmin any all cumsum count_nonzero outer "
              "expand_dims squeeze reshape transpose swapaxes moveaxis ravel tril triu eye "
              "take rint").split()
_CREATION = "zeros empty".split()  # memset/allocation only: no kernel to compile
_DTYPES = "float16 float32 float64 int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool_ complex64 complex128".split()

cupy = types.ModuleType("cupy", "The CuPy stand-in of the test suite (tests/cupy_standin.py).")
cupy.__dict__.update({name: _function(name) for name in _FUNCTIONS})
cupy.__dict__.update({name: _function(name, kernel=False) for name in _CREATION})
cupy.__dict__.update({name: getattr(np, name) for name in _DTYPES})
cupy.__dict__.update(
    ndarray=ndarray, asarray=asarray, array=array, asnumpy=asnumpy, get_array_module=get_array_module,
    split=split, take_along_axis=take_along_axis, arange=_function("arange"),
    nonzero=_reading_function("nonzero"), flatnonzero=_reading_function("flatnonzero"),
    argwhere=_reading_function("argwhere"), dtype=np.dtype, newaxis=None, inf=np.inf, nan=np.nan, pi=np.pi,
    e=np.e, random=types.SimpleNamespace(RandomState=RandomState), cuda=cuda,
    __version__="14.0.0+standin",
)


def scatter_add(a, slices, value):
    """cupyx.scatter_add: a[slices] += value with repeated indices adding up."""
    if not isinstance(a, ndarray):
        raise TypeError(f"cupyx.scatter_add: a must be a cupy array, got {type(a)}")
    index = _index(slices, a.shape, "scatter_add")
    value = _unwrap(value, "cupyx.scatter_add")
    _launch()
    np.add.at(a._a, index, value)


cupyx = types.ModuleType("cupyx", "cupyx of the CuPy stand-in (tests/cupy_standin.py).")
cupyx.scatter_add = scatter_add


def install() -> None:
    """``import cupy`` / ``import cupyx`` give the stand-in from now on (tinytensor's one import point
    is ``tinytensor.backend._import_cupy``, which then caches it)."""
    sys.modules["cupy"], sys.modules["cupyx"] = cupy, cupyx


def installed() -> bool:
    return sys.modules.get("cupy") is cupy
