"""Drop-in nn.Module versions of the custom layers."""
from __future__ import annotations

import copy
import dis
import importlib
import linecache
import logging
import sys
import types
import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from . import functional as F
from . import init as _init

__all__ = ["CenteredLayer", "FusedLinear", "LazyMyLinear", "LinearReLU", "MyLinear", "convert"]


class CenteredLayer(nn.Module):
    """The book's ``CenteredLayer``: ``X - X.mean()``; with ``dim``, ``X - X.mean(dim, keepdim=True)``.

    >>> CenteredLayer()(torch.tensor([1.0, 2, 3, 4, 5]))
    tensor([-2., -1.,  0.,  1.,  2.])
    """

    def __init__(self, dim: Optional[Union[int, Sequence[int]]] = None):
        super().__init__()
        self.dim = dim if dim is None or isinstance(dim, int) else tuple(dim)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            return F.centered(X, self.dim)
        # TorchScript: dim is typed by its value (None, int or a tuple); centered takes an int or a List[int].
        dim = self.dim
        if dim is None or isinstance(dim, int):
            return F.centered(X, dim)
        dims: List[int] = []
        for d in dim:
            dims.append(d)
        return F.centered(X, dims)

    def extra_repr(self) -> str:
        return "" if self.dim is None else f"dim={self.dim}"


_ACTIVATIONS = ("relu", "none")
_INITS = ("default", "randn")


class MyLinear(nn.Module):
    """The book's ``MyLinear``: ``relu(X @ weight + bias)`` with weight (in_units, units) and bias (units,),
    as one fused op (customlayers.functional.linear_act), differentiable unlike the book's ``.data``.
    The weight is a contiguous (in_units, units) Parameter, as the book's.

    Args:
        in_units, units: input and output features.
        bias: learn a bias (default True).
        activation: 'relu' (the book's) or 'none'.
        init: 'default' (nn.Linear's initialization, see reset_parameters) or 'randn' (the book's:
            weight and bias drawn from torch.randn).

    >>> MyLinear(5, 3).weight.shape
    torch.Size([5, 3])
    """

    def __init__(self, in_units: int, units: int, bias: bool = True, activation: str = "relu",
                 device=None, dtype=None, init: str = "default"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MyLinear: activation must be 'relu' or 'none', but got {activation!r}")
        if init not in _INITS:
            raise ValueError(f"MyLinear: init must be 'default' or 'randn', but got {init!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_units, self.units, self.activation, self.init = in_units, units, activation, init
        self.weight = nn.Parameter(torch.empty((in_units, units), **factory))
        self.bias = nn.Parameter(torch.empty(units, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialize the parameters in place. init='default': nn.Linear's initialization applied to
        the transposed layout (bounds from in_units: weight and bias ~ U(-1/sqrt(in_units), 1/sqrt(in_units)));
        under the same seed, the weight equals ``nn.Linear(in_units, units).weight.t()`` and the bias
        ``nn.Linear(in_units, units).bias``. init='randn': the book's ``torch.randn`` for both."""
        if self.init == "randn":
            with torch.no_grad():
                self.weight.normal_()
                if self.bias is not None:
                    self.bias.normal_()
            return
        _init.linear_(self.weight, self.bias, transposed=True)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return F.linear_act(X, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return (f"in_units={self.in_units}, units={self.units}, bias={self.bias is not None}, "
                f"activation={self.activation!r}" + (f", init={self.init!r}" if self.init != "default" else ""))


class LazyMyLinear(LazyModuleMixin, MyLinear):
    """MyLinear whose in_units is inferred from the first input (like nn.LazyLinear); it then becomes
    a MyLinear."""

    cls_to_become = MyLinear
    weight: UninitializedParameter
    bias: UninitializedParameter  # type: ignore[assignment]

    def __init__(self, units: int, bias: bool = True, activation: str = "relu", device=None, dtype=None,
                 init: str = "default"):
        factory = {"device": device, "dtype": dtype}
        super().__init__(0, 0, False, activation, init=init)  # parameters replaced below
        self.units = units
        self.weight = UninitializedParameter(**factory)
        if bias:
            self.bias = UninitializedParameter(**factory)

    def reset_parameters(self) -> None:
        # units == 0: MyLinear.__init__'s placeholders (or no outputs: nothing to fill). in_units == 0 (an
        # input of shape (*, 0)) still initializes: the bias gets zeros as in MyLinear(0, units), not
        # materialize()'s memory.
        if not self.has_uninitialized_params() and self.units != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: torch.Tensor) -> None:  # noqa: A002 (LazyModuleMixin's name)
        if self.has_uninitialized_params():
            with torch.no_grad():
                self.in_units = input.shape[-1]
                self.weight.materialize((self.in_units, self.units))
                if self.bias is not None:
                    self.bias.materialize((self.units,))
                self.reset_parameters()

    def __prepare_scriptable__(self):
        """torch.jit.script calls it first: an unmaterialized layer has no shapes to compile."""
        if self.has_uninitialized_params():
            raise RuntimeError("LazyMyLinear: torch.jit.script needs its shapes: run a first input through it "
                               "(it then becomes a MyLinear), or use torch.jit.trace or torch.export with an "
                               "example input")
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # LazyModuleMixin's load hook has materialized the weight with the checkpoint's shape: take in_units
        # from it, as the first input would.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not nn.parameter.is_lazy(self.weight):
            self.in_units = self.weight.shape[0]


# The weight types LinearReLU and FusedLinear run the op on: plain tensors and Parameters, the tensors of
# torch.compile and torch.export (fake, functional); DTensor too (customlayers._dtensor registers the ops'
# rules), added by _subclass_forward when it first meets one (torch.distributed.tensor is not imported here).
_OP_TENSORS = {torch.Tensor, nn.Parameter, torch._subclasses.fake_tensor.FakeTensor,
               torch._subclasses.functional_tensor.FunctionalTensor}


class _KernelLinear(nn.Linear):
    """An nn.Linear whose forward is the linear_act kernel with activation ``_act``: nn.Linear's attributes,
    parameter names, shapes (weight (out_features, in_features), bias (out_features,)), repr fields and
    initialization, so state_dicts load both ways. The kernel reads the (out_features, in_features) weight
    as it is (weight_t=True)."""

    _act = "none"
    __constants__ = [*nn.Linear.__constants__, "_act"]  # torch.jit.script reads _act as a constant

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name)
        weight = self.weight
        if not torch.jit.is_scripting():
            if type(weight) not in _OP_TENSORS:
                return self._subclass_forward(input, weight)
        return F.linear_act(input, weight, self.bias, self._act, weight_t=True)

    @torch.jit.unused
    def _subclass_forward(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # noqa: A002
        """A weight of a tensor subclass other than the ones the op serves (_OP_TENSORS), such as torchao's
        quantized weights (torchao.quantization.quantize_ puts them in every nn.Linear), runs through F.linear,
        which such subclasses implement, then the activation: the same result."""
        dtensor = sys.modules.get("torch.distributed.tensor")
        if dtensor is not None and isinstance(weight, dtensor.DTensor):
            _OP_TENSORS.add(type(weight))
            return F.linear_act(input, weight, self.bias, self._act, weight_t=True)
        out = torch.nn.functional.linear(input, weight, self.bias)
        return torch.relu(out) if self._act == "relu" else out

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        """This layer over linear's Parameter objects, SHARED (no copy): training one trains the other."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def to_linear(self) -> nn.Linear:
        """The nn.Linear part (without an activation), SHARING this module's Parameter objects (no copy)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear


class FusedLinear(_KernelLinear):
    """``nn.Linear`` as one linear_act op (act='none': the GEMM and the bias in one kernel, dX, dW and the
    bias gradient in one backward): a drop-in subclass of nn.Linear. convert() makes one of each output
    layer (out_features <= OUTPUT_FEATURES, not followed by a ReLU), where the hand-written CPU kernel
    beats nn.Linear's GEMMs. ``FusedLinear.from_linear(linear)`` shares linear's Parameters."""


class LinearReLU(_KernelLinear):
    """``relu(nn.Linear(x))`` as one fused op: a drop-in for ``nn.Sequential(nn.Linear(in, out), nn.ReLU())``.

    It is an ``nn.Linear`` (a subclass: ``isinstance(m, nn.Linear)`` holds, so initializers written for
    nn.Linear reach it) with nn.Linear's attributes, parameter names, shapes (weight (out_features,
    in_features), bias (out_features,)), repr fields and initialization, so state_dicts load both ways; only
    ``forward`` differs. The kernel reads the weight as it is, without copying it.
    ``LinearReLU.from_linear(linear)`` computes relu(linear(x)) over linear's Parameters (shared);
    ``to_linear()`` gives the nn.Linear part back, sharing them too.
    """

    _act = "relu"


# ------------------------------------------------------------------------------------------ convert

# convert() runs nn.Linear layers with at most this many outputs (output layers) as FusedLinear: there the
# CPU kernels' dot products beat BLAS's GEMMs, which waste most of their tiles on so few columns.
OUTPUT_FEATURES = 16
_RELU_FUNCTIONS = (torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.relu_)
_RELU_METHODS = ("relu", "relu_")
_log = logging.getLogger("customlayers")


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer, with the customlayers modules as leaves too (their ops are not traceable
    by fx)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (CenteredLayer, MyLinear, _KernelLinear)) or super().is_leaf_module(m, module_qualified_name)


def convert(model: nn.Module, inplace: bool = False, report: bool = False, outputs: bool = True):
    """Fuse every ``nn.Linear`` whose output goes only to a ReLU into a LinearReLU (sharing the Linear's
    Parameters): the model computes the same outputs and gradients with one op per pair. With
    ``outputs=True`` (the default) every other ``nn.Linear`` with at most ``OUTPUT_FEATURES`` (16) outputs
    (an output layer, such as the book's 256 -> 10) becomes a FusedLinear (same Parameters), one op
    forward and one backward where nn.Linear runs a GEMM and a bias add, then three GEMM-sized ops.

    Where ``torch.fx.symbolic_trace`` can trace a module's forward, any ReLU counts: ``nn.ReLU`` (in place
    or not), ``F.relu`` (``inplace=True`` too), ``torch.relu``, ``torch.relu_``, ``x.relu()``, ``x.relu_()``
    (e.g. the book's ``MLP``, whose forward is ``self.out(F.relu(self.hidden(X)))``, ``MySequential``,
    nested blocks). An ``nn.ReLU`` module left without a use becomes ``nn.Identity``; when a functional
    ReLU is fused, the traced module's forward becomes the traced code without it (the module keeps its
    class as a base class, its attributes and methods; it pickles with ``torch.save`` and loads wherever its
    class imports, the fused forward rebuilt from its code, and scripts with ``torch.jit.script``).
    A module fx cannot trace (Python control flow on tensors, as the book's ``FixedHiddenMLP``), or whose
    forward reads ``self.training`` (a trace would fix that branch to the current mode) or sets attributes
    (side effects a trace drops), is not traced but searched inside: its children are tried, and in an
    ``nn.Sequential`` every ``nn.Linear`` directly followed by ``nn.ReLU`` is fused.

    Initializers that test ``type(m) == nn.Linear`` (the book's) skip a LinearReLU: apply them before
    convert() (``isinstance(m, nn.Linear)`` reaches it). Lazy layers are fused once a first input has
    given them their shapes.

    Parameter names are unchanged (LinearReLU has nn.Linear's), so checkpoints load both ways. A Linear
    used in several places (tied) is fused only where every use is followed by a ReLU, and becomes one
    LinearReLU object wherever it appears. Linears and ReLU modules with hooks (pruning's, the old
    ``weight_norm``'s), parametrized Linears and Linears whose weight or bias is not a plain Parameter (a
    pruned tensor, a torchao-quantized or DTensor subclass) are left alone, on every path. With
    ``inplace=False`` the model is deep-copied first (ties within the model are kept in the copy).

    Returns the model, or with ``report=True`` ``(model, names)``, ``names`` the qualified names of the
    replaced Linears (fused with their ReLU, or output layers). The names are also logged (logger
    ``customlayers``, level INFO); a ``UserWarning`` says when nothing was replaced.
    """
    if not inplace:
        model = copy.deepcopy(model)
    fused: Dict[int, _KernelLinear] = {}
    _convert(model, fused)
    made = {id(m) for m in fused.values()}
    if outputs:
        made |= {id(m) for m in _convert_outputs(model).values()}
    names = [name for name, module in model.named_modules(remove_duplicate=False) if id(module) in made]
    for cls, what in ((LinearReLU, "nn.Linear + ReLU into LinearReLU"), (FusedLinear, "output nn.Linear into FusedLinear")):
        these = [name for name in names if type(model.get_submodule(name)) is cls]
        if these:
            _log.info("customlayers.convert: fused %d %s: %s", len(these), what, ", ".join(these))
    if not names:
        warnings.warn("customlayers.convert: found no nn.Linear whose output goes only to a ReLU"
                      + (f" and no other submodule nn.Linear with at most {OUTPUT_FEATURES} outputs" if outputs else "")
                      + "; the model is unchanged (lazy layers are converted once a first input has given them"
                      " their shapes)", UserWarning, stacklevel=2)
    return (model, names) if report else model


def _convert_outputs(model: nn.Module) -> Dict[int, "FusedLinear"]:
    """Every nn.Linear left with at most OUTPUT_FEATURES outputs -> a FusedLinear, wherever it appears (one per
    Linear; a Linear fused with a ReLU elsewhere keeps its plain uses here, as a FusedLinear over the same
    Parameters). Linears with hooks (e.g. the old weight_norm's, which recomputes the weight) or whose weight
    or bias is not a Parameter are left alone."""
    made: Dict[int, FusedLinear] = {}
    for sub in model.modules():
        for name, child in sub._modules.items():
            if _plain_output_layer(child):
                if id(child) not in made:
                    made[id(child)] = FusedLinear.from_linear(child)
                sub._modules[name] = made[id(child)]
    return made


def _plain_output_layer(m: Optional[nn.Module]) -> bool:
    return _replaceable(m, nn.Linear) and m.out_features <= OUTPUT_FEATURES


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _replaceable(m: Optional[nn.Module], cls: type) -> bool:
    """m is exactly a cls (nn.Linear or nn.ReLU; a parametrized Linear is a subclass) without hooks (pruning,
    the old weight_norm and spectral_norm recompute the weight in a pre-hook), and a Linear's weight and bias are
    plain Parameters: not plain tensors (pruned), nor tensor subclasses (quantized by torchao, DTensor)."""
    if type(m) is not cls or _hooked(m):
        return False
    if cls is nn.Linear:
        return (not torch.nn.utils.parametrize.is_parametrized(m) and type(m.weight) is nn.Parameter
                and (m.bias is None or type(m.bias) is nn.Parameter))
    return True


def _convert(module: nn.Module, fused: Dict[int, _KernelLinear]) -> None:
    tracer = _Tracer()
    graph = None
    if not _trace_would_change_behaviour(module, tracer):
        try:
            graph = tracer.trace(module)
        except Exception:  # noqa: BLE001 (fx raises many kinds: TraceError, TypeError, NotImplementedError, ...)
            graph = None
    if graph is not None:
        _fuse_graph(module, graph, fused)
        return
    _fuse_sequential(module, fused)
    for child in module.children():
        _convert(child, fused)


def _trace_would_change_behaviour(module: nn.Module, tracer: _Tracer) -> bool:
    """A forward a trace runs (module's or a traced submodule's) reads ``self.training`` (the trace keeps the
    branch of the current mode) or sets or deletes attributes (tracing would run those side effects with
    fx Proxies, and the traced code drops them)."""
    for m in module.modules():
        code = getattr(type(m).forward, "__code__", None)
        if code is None or (m is not module and tracer.is_leaf_module(m, "")):
            continue
        if "training" in code.co_names or any(ins.opname in ("STORE_ATTR", "DELETE_ATTR")
                                              for ins in dis.get_instructions(code)):
            return True
    return False


def _fuse_sequential(module: nn.Module, fused: Dict[int, _KernelLinear]) -> None:
    """In an nn.Sequential: each nn.Linear directly followed by an nn.ReLU."""
    if not isinstance(module, nn.Sequential):
        return
    names = list(module._modules)
    for first, second in zip(names, names[1:]):
        linear, relu = module._modules[first], module._modules[second]
        if _replaceable(linear, nn.Linear) and _replaceable(relu, nn.ReLU):
            if id(linear) not in fused:
                fused[id(linear)] = LinearReLU.from_linear(linear)
            module._modules[first] = fused[id(linear)]
            module._modules[second] = nn.Identity()


def _relu_of(node: torch.fx.Node, module: nn.Module) -> bool:
    """node computes relu(its first argument) and nothing else."""
    if node.op == "call_module":
        return _replaceable(module.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    return node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1 and not node.kwargs


def _fuse_graph(module: nn.Module, graph: torch.fx.Graph, fused: Dict[int, _KernelLinear]) -> None:
    """Fuse in the traced forward of module: a Linear is fused when each of its calls feeds one ReLU only."""
    calls: Dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "call_module" and _replaceable(module.get_submodule(node.target), nn.Linear):
            calls.setdefault(node.target, []).append(node)
    relus, linears = [], {}
    for target, nodes in calls.items():
        users = [next(iter(node.users)) if len(node.users) == 1 else None for node in nodes]
        if all(user is not None and _relu_of(user, module) and user.args[0] is node
               for node, user in zip(nodes, users)):
            linear = module.get_submodule(target)
            linears[id(linear)] = linear
            relus += list(zip(nodes, users))
    if not relus:
        return
    # nn.ReLU modules the graph will no longer call become nn.Identity: the forward needs no change for those.
    erased = {relu for _, relu in relus}
    called = {node.target for node in graph.nodes if node.op == "call_module" and node not in erased}
    removed = {relu.target for relu in erased if relu.op == "call_module"} - called
    new_forward = any(relu.op != "call_module" or relu.target not in removed for relu in erased)
    for linear in linears.values():
        if id(linear) not in fused:
            fused[id(linear)] = LinearReLU.from_linear(linear)
    # Every reference to a fused Linear inside module (the forward may call it by any of them) -> LinearReLU.
    for sub in module.modules():
        for name, child in sub._modules.items():
            if id(child) in linears:
                sub._modules[name] = fused[id(child)]
    for target in removed:
        parent, _, name = target.rpartition(".")
        setattr(module.get_submodule(parent), name, nn.Identity())
    if new_forward:
        for node, relu in relus:
            relu.replace_all_uses_with(node)
            graph.erase_node(relu)
        code = graph.python_code(root_module="self")
        module.__class__ = _converted_class(type(module), code.src, _globals_spec(code.globals))


# The classes of modules whose forward convert() rewrote: (base class, forward source, globals) -> class.
_CONVERTED: Dict[tuple, type] = {}


def _globals_spec(namespace: Dict[str, object]) -> tuple:
    """The traced code's globals, modules by name (so that the spec pickles and deep-copies)."""
    return tuple(sorted((name, ("module", value.__name__) if isinstance(value, types.ModuleType) else ("object", value))
                        for name, value in namespace.items()))


def _converted_class(base: type, src: str, spec: tuple) -> type:
    """A subclass of base whose forward is the traced, fused code src. It keeps base's name, attributes and
    methods; it pickles (torch.save of the whole model, copy.deepcopy) as base's state plus the code, and
    unpickling rebuilds the class here (_rebuild_converted), so no class needs to be importable by its name."""
    base = base.__dict__.get("_customlayers_converted_from", base)  # converting a converted module again
    try:
        key = (base, src, tuple((name, repr(ref) if isinstance(ref, float) else ref)  # nan != nan
                                for name, (_, ref) in spec))
        cls = _CONVERTED.get(key)
    except TypeError:  # an unhashable global: a class per call
        key, cls = None, None
    if cls is not None:
        return cls
    namespace = {name: importlib.import_module(ref) if kind == "module" else ref for name, (kind, ref) in spec}
    filename = f"<customlayers.convert: {base.__module__}.{base.__qualname__}.forward #{len(_CONVERTED)}>"
    # The source in linecache, as torch.fx does for GraphModules: tracebacks, inspect and torch.jit.script read it.
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    exec(compile(src, filename, "exec"), namespace)

    def __reduce_ex__(self, protocol):
        rebuilt = object.__reduce_ex__(self, protocol)  # (copyreg.__newobj__, (cls,), state, ...)
        return (_rebuild_converted, (base, src, spec), *rebuilt[2:])

    cls = type(base.__name__, (base,), {"forward": namespace["forward"], "__module__": base.__module__,
                                         "__qualname__": base.__qualname__, "__reduce_ex__": __reduce_ex__,
                                         "_customlayers_converted_from": base})
    if key is not None:
        _CONVERTED[key] = cls
    return cls


def _rebuild_converted(base: type, src: str, spec: tuple) -> nn.Module:
    """Unpickling a module whose forward convert() rewrote: an empty instance of its class, rebuilt from the
    base class and the fused forward's code; pickle then restores its state (nn.Module.__setstate__)."""
    cls = _converted_class(base, src, spec)
    return cls.__new__(cls)
