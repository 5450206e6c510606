"""customlayers.convert(): fusing a model's nn.Linear layers with the activations that follow them into
FusedLinear layers (LinearReLU, LinearGELU, LinearSiLU, or FusedLinear(activation=...)), in nn.Sequential
and, through torch.fx, in any traceable forward, where gated units (act(gate(x)) * up(x)) become linear_glu;
and its output layers into FusedLinear."""
from __future__ import annotations

import copy
import dis
import importlib
import linecache
import logging
import operator
import types
import warnings
from typing import Dict, Optional

import torch
from torch import nn

from . import _activations, _ops
from . import functional as _functional
from .nn import CenteredLayer, FusedLinear, GatedMLP, LinearGELU, LinearReLU, LinearSiLU, MyLinear

__all__ = ["OUTPUT_FEATURES", "convert"]

# convert() runs nn.Linear layers with at most this many outputs (output layers) as FusedLinear: there the
# CPU kernels' dot products beat BLAS's GEMMs, which waste most of their tiles on so few columns.
OUTPUT_FEATURES = 16
# The activations with a class of their own; the others fuse into FusedLinear(activation=...).
_NAMED = {cls._act: cls for cls in (LinearReLU, LinearGELU, LinearSiLU)}
_log = logging.getLogger("customlayers")


_LAYERS = (CenteredLayer, MyLinear, FusedLinear, GatedMLP)


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer, with the customlayers modules as leaves too (their ops are not traceable
    by fx)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LAYERS) or super().is_leaf_module(m, module_qualified_name)


def convert(model: nn.Module, inplace: bool = False, report: bool = False, outputs: bool = True,
            linears: Optional[bool] = None):
    """Fuse every ``nn.Linear`` whose output goes only to an activation into one FusedLinear (sharing the
    Linear's Parameters): LinearReLU for ReLU, LinearGELU for GELU (erf), LinearSiLU for SiLU, and
    FusedLinear(activation=...) for GELU's tanh approximation ('gelu_tanh'), Tanh and Sigmoid. The model
    computes the same outputs and gradients with one op per pair. With ``outputs=True`` (the default) every
    other ``nn.Linear`` with at most ``OUTPUT_FEATURES`` (16) outputs (an output layer, such as the book's
    256 -> 10) becomes a FusedLinear (same Parameters), one op forward and one backward where nn.Linear runs
    a GEMM and a bias add, then three GEMM-sized ops. With ``linears=True`` every other float32 ``nn.Linear``
    does too, whatever its width; ``None`` (the default) does so where the CPU kernels' float32 GEMM is
    faster than BLAS's (``backend_report()["build"]["cpu_gemms"]["float32"]`` names ``gemm_f32``: AMD Zen 5,
    where MKL runs AVX2), ``False`` never.

    Where ``torch.fx.symbolic_trace`` can trace a module's forward, any form of an activation counts
    (customlayers._activations' MODULES, FUNCTIONS and METHODS): the modules ``nn.ReLU``, ``nn.GELU`` (both
    ``approximate`` values), ``nn.SiLU``, ``nn.Tanh``, ``nn.Sigmoid`` (in place or not); the functions
    ``F.relu``, ``torch.relu``, ``F.gelu`` (``approximate='tanh'`` too), ``F.silu``, ``torch.tanh``,
    ``F.tanh``, ``torch.sigmoid``, ``F.sigmoid`` and their in-place forms (``inplace=True``, ``torch.relu_``,
    ``torch.tanh_``, ...); the methods ``x.relu()``, ``x.tanh()``, ``x.sigmoid()`` and their in-place forms
    (e.g. the book's ``MLP``, whose forward is ``self.out(F.relu(self.hidden(X)))``, ``MySequential``,
    nested blocks, a residual block ``x + self.fc2(F.gelu(self.fc1(x)))``). There, too, a gated unit
    ``act(self.gate_proj(x)) * self.up_proj(x)`` (either operand order, any activation form above; two
    nn.Linear of one shape, dtype and device on the same x, each called only there, their outputs used only
    there: LLaMA's, Mistral's, Qwen's and Gemma's MLPs) becomes one ``linear_glu`` call on the two Linears' Parameters (the Linears stay, uncalled,
    so parameter names are unchanged), and the nn.Linear applied to it alone (the down projection) a
    FusedLinear. An activation module left
    without a use becomes ``nn.Identity``; when a functional activation is fused, the traced module's
    forward becomes the traced code without it (the module keeps its class as a base class, its attributes
    and methods; it pickles with ``torch.save`` and loads wherever its class imports, the fused forward
    rebuilt from its code, and scripts with ``torch.jit.script``).
    A module fx cannot trace (Python control flow on tensors, as the book's ``FixedHiddenMLP``), or whose
    forward reads ``self.training`` (a trace would fix that branch to the current mode) or sets attributes
    (side effects a trace drops), is not traced but searched inside: its children are tried, and in an
    ``nn.Sequential`` every ``nn.Linear`` directly followed by an activation module is fused.

    Initializers that test ``type(m) == nn.Linear`` (the book's) skip a FusedLinear: apply them before
    convert() (``isinstance(m, nn.Linear)`` reaches it). Lazy layers are fused once a first input has
    given them their shapes.

    Parameter names are unchanged (FusedLinear has nn.Linear's), so checkpoints load both ways. A Linear
    used in several places (tied) is fused only where every use is followed by the same activation, and
    becomes one FusedLinear object wherever it appears. Linears and activation modules with hooks
    (pruning's, the old ``weight_norm``'s), parametrized Linears and Linears whose weight or bias is not a
    plain Parameter (a pruned tensor, a torchao-quantized or DTensor subclass) are left alone, on every
    path. With ``inplace=False`` the model is deep-copied first (ties within the model are kept in the copy).

    Returns the model, or with ``report=True`` ``(model, names)``, ``names`` the qualified names of the
    replaced Linears (fused with their activation, output layers, down projections) and of the gated units'
    Linears. What was fused is also logged
    (logger ``customlayers``, level INFO: the activation, the class and the names); a ``UserWarning`` says
    when nothing was replaced.
    """
    if not inplace:
        model = copy.deepcopy(model)
    fused: Dict[int, FusedLinear] = {}
    glus: list = []  # (gate Linear, up Linear, act, down Linear or None) of each gated unit fused
    _convert(model, fused, glus)
    made = {id(m) for m in fused.values()}
    wide = _own_float32_gemm() if linears is None else linears
    if outputs or wide:
        skip = {id(g[i]) for g in glus for i in (0, 1)}
        made |= {id(m) for m in _convert_outputs(model, skip, outputs, wide).values()}
    names = [name for name, module in model.named_modules(remove_duplicate=False) if id(module) in made]
    gated = _glu_names(model, glus, fused)
    for act in sorted({g[2] for g in gated}):
        pairs = [f"{gate} * {up}" + (f" (down projection {down} into FusedLinear)" if down else "")
                 for gate, up, a, down in gated if a == act]
        _log.info("customlayers.convert: fused %d %s(gate) * up pairs of nn.Linear into linear_glu: %s", len(pairs),
                  act, ", ".join(pairs))
    downs = {g[3] for g in gated}
    kinds: Dict[str, list] = {}  # what was fused into which class -> names
    for name in (n for n in names if n not in downs):
        module = model.get_submodule(name)
        what = (f"nn.Linear + {module.activation}" if module.activation != "none" else
                "output nn.Linear" if module.out_features <= OUTPUT_FEATURES else "other nn.Linear")
        kinds.setdefault(f"{what} into {type(module).__name__}", []).append(name)
    for what, these in kinds.items():
        _log.info("customlayers.convert: fused %d %s: %s", len(these), what, ", ".join(these))
    names += [name for gate, up, _, _ in gated for name in (gate, up)]
    if not names:
        warnings.warn("customlayers.convert: found no nn.Linear whose output goes only to an activation ("
                      + ", ".join(name for name in _activations.NAMES if name != "none") + ")"
                      + (f" and no other submodule nn.Linear with at most {OUTPUT_FEATURES} outputs" if outputs else "")
                      + "; the model is unchanged (lazy layers are converted once a first input has given them"
                      " their shapes)", UserWarning, stacklevel=2)
    return (model, names) if report else model


def _glu_names(model: nn.Module, glus: list, fused: Dict[int, FusedLinear]) -> list:
    """The fused gated units' (gate, up, act, down), the Linears by qualified name in model (down: its
    FusedLinear's, or None)."""
    names: Dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), name)
    def name(linear):  # the Linear, or what fused it elsewhere (a tied Linear fused with an activation)
        return names.get(id(linear)) or names[id(fused[id(linear)])]
    return [(name(gate), name(up), act, None if down is None else name(down)) for gate, up, act, down in glus]


def _own_float32_gemm() -> bool:
    """Whether the CPU kernels run float32 GEMMs on gemm_f32 (faster than BLAS there, csrc/cpu/gemm_f32.cpp)."""
    return _ops.build_info().get("cpu_gemms", {}).get("float32", "").startswith("gemm_f32")


def _convert_outputs(model: nn.Module, skip: set, outputs: bool = True, wide: bool = False) -> Dict[int, "FusedLinear"]:
    """Every nn.Linear left with at most OUTPUT_FEATURES outputs (`outputs`), and every other float32 one
    (`wide`) -> a FusedLinear, wherever it appears (one per
    Linear; a Linear fused with a ReLU elsewhere keeps its plain uses here, as a FusedLinear over the same
    Parameters), but those in `skip` (ids: the gated units' gate and up, which hold linear_glu's parameters,
    uncalled) and a GatedMLP's. Linears with hooks (e.g. the old weight_norm's, which recomputes the weight) or whose weight
    or bias is not a Parameter are left alone."""
    made: Dict[int, FusedLinear] = {}
    for sub in model.modules():
        if isinstance(sub, GatedMLP):  # its projections hold the parameters of its ops
            continue
        for name, child in sub._modules.items():
            if id(child) not in skip and _replaceable(child, nn.Linear) and (
                    (outputs and child.out_features <= OUTPUT_FEATURES) or (wide and child.weight.dtype == torch.float32)):
                if id(child) not in made:
                    made[id(child)] = FusedLinear.from_linear(child)
                sub._modules[name] = made[id(child)]
    return made


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _replaceable(m: Optional[nn.Module], cls: type) -> bool:
    """m is exactly a cls (nn.Linear or an activation module; a parametrized Linear is a subclass) without hooks (pruning,
    the old weight_norm and spectral_norm recompute the weight in a pre-hook), and a Linear's weight and bias are
    plain Parameters: not plain tensors (pruned), nor tensor subclasses (quantized by torchao, DTensor)."""
    if type(m) is not cls or _hooked(m):
        return False
    if cls is nn.Linear:
        return (not torch.nn.utils.parametrize.is_parametrized(m) and type(m.weight) is nn.Parameter
                and (m.bias is None or type(m.bias) is nn.Parameter))
    return True


def _convert(module: nn.Module, fused: Dict[int, FusedLinear], glus: list) -> None:
    tracer = _Tracer()
    if isinstance(module, _LAYERS):
        return  # a customlayers layer: nothing inside to fuse (a GatedMLP's Linears hold its op's parameters)
    graph = None
    if not _trace_would_change_behaviour(module, tracer):
        try:
            graph = tracer.trace(module)
        except Exception:  # noqa: BLE001 (fx raises many kinds: TraceError, TypeError, NotImplementedError, ...)
            graph = None
    if graph is not None:
        _fuse_graph(module, graph, fused, glus)
        return
    _fuse_sequential(module, fused)
    for child in module.children():
        _convert(child, fused, glus)


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


def _module_activation(m: Optional[nn.Module]) -> Optional[str]:
    """The activation an activation module computes (an exact class of _activations.MODULES, without hooks),
    else None."""
    of = _activations.MODULES.get(type(m))
    return of(m) if of is not None and _replaceable(m, type(m)) else None


def _fused(linear: nn.Linear, act: str, fused: Dict[int, FusedLinear]) -> FusedLinear:
    """The fused layer of linear with act, made once per Linear."""
    if id(linear) not in fused:
        cls = _NAMED.get(act)
        fused[id(linear)] = cls.from_linear(linear) if cls is not None else FusedLinear.from_linear(linear, act)
    return fused[id(linear)]


def _fuse_sequential(module: nn.Module, fused: Dict[int, FusedLinear]) -> None:
    """In an nn.Sequential: each nn.Linear directly followed by an activation module."""
    if not isinstance(module, nn.Sequential):
        return
    names = list(module._modules)
    for first, second in zip(names, names[1:]):
        linear, act = module._modules[first], _module_activation(module._modules[second])
        known = fused.get(id(linear))
        if _replaceable(linear, nn.Linear) and act is not None and (known is None or known.activation == act):
            module._modules[first] = _fused(linear, act, fused)
            module._modules[second] = nn.Identity()


def _activation_of(node: torch.fx.Node, module: nn.Module) -> Optional[str]:
    """The activation node computes of its first argument (and nothing else), or None."""
    if node.op == "call_module":
        return _module_activation(module.get_submodule(node.target))
    if node.op == "call_function":
        return _activations.of_call(node.target, node.kwargs) if len(node.args) == 1 else None
    if node.op == "call_method" and len(node.args) == 1 and not node.kwargs:
        return _activations.METHODS.get(node.target)
    return None


def _is_mul(node: torch.fx.Node) -> bool:
    """node is a product of two values: a * b, torch.mul(a, b), a.mul(b)."""
    if node.kwargs or len(node.args) != 2:
        return False
    return ((node.op == "call_function" and node.target in (operator.mul, torch.mul))
            or (node.op == "call_method" and node.target == "mul"))


def _in_place(node: torch.fx.Node) -> bool:
    """node may write to a tensor: an in-place method or function (name ending in '_'), inplace=True, out=."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return ((node.op in ("call_method", "call_function") and name.endswith("_") and not name.startswith("_"))
            or bool(node.kwargs.get("inplace")) or "out" in node.kwargs)


def _only_user(node: object, user: torch.fx.Node) -> bool:
    return isinstance(node, torch.fx.Node) and set(node.users) == {user}


def _linear_call(node: object, module: nn.Module) -> Optional[nn.Linear]:
    """The plain nn.Linear node calls on one positional input, or None."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_module" and len(node.args) == 1 and not node.kwargs):
        return None
    linear = module.get_submodule(node.target)
    return linear if _replaceable(linear, nn.Linear) else None


def _fuse_glus(module: nn.Module, graph: torch.fx.Graph, fused: Dict[int, FusedLinear], glus: list) -> bool:
    """In the traced forward of module: each ``act(gate(x)) * up(x)`` (either operand order; gate and up
    plain nn.Linear layers of one shape and bias presence, called on the same x, each value used only there)
    -> one linear_glu call on the Linears' Parameters (the Linears stay, uncalled: parameter names are
    unchanged), and a plain nn.Linear applied to that product only (the gated MLP's down projection) -> a
    FusedLinear. Appends (gate, up, act, the down projection or None) to glus; returns whether the graph
    changed."""
    downs = {}
    order = {node: i for i, node in enumerate(graph.nodes)}
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph.nodes):
        if not _is_mul(node):
            continue
        for act_node, up_node in (node.args, node.args[::-1]):
            if not (_only_user(act_node, node) and _only_user(up_node, node)) or act_node is up_node:
                continue
            act = _activation_of(act_node, module)
            gate_node = act_node.args[0] if act is not None and act_node.args else None
            gate, up = _linear_call(gate_node, module), _linear_call(up_node, module)
            if (gate is None or up is None or gate is up or not _only_user(gate_node, act_node)
                    or gate_node.args[0] is not up_node.args[0] or id(gate) in fused or id(up) in fused
                    or calls[gate_node.target] != 1 or calls[up_node.target] != 1  # called elsewhere too
                    or gate.weight.shape != up.weight.shape or (gate.bias is None) != (up.bias is None)
                    or gate.weight.dtype != up.weight.dtype or gate.weight.device != up.weight.device):
                continue
            # x used by anything else between the two calls and the product (an in-place update, say) would
            # be read after it by the one call that replaces them.
            # Nor an in-place op between them (it may change x through a view).
            x, first = gate_node.args[0], min(order[gate_node], order[up_node])
            if any(first < order.get(user, -1) < order[node] and user not in (gate_node, up_node) for user in x.users):
                continue
            if any(first < order[n] < order[node] and _in_place(n) for n in order):
                continue
            with graph.inserting_before(node):
                attrs = [graph.get_attr(f"{target}.{name}") if getattr(linear, name) is not None else None
                         for name in ("weight", "bias") for target, linear in ((gate_node.target, gate),
                                                                                 (up_node.target, up))]
                glu = graph.call_function(_functional.linear_glu, (gate_node.args[0], attrs[0], attrs[1], attrs[2],
                                                                    attrs[3], act, True))
            order[glu] = order[node]
            node.replace_all_uses_with(glu)
            for erased in (node, act_node, gate_node, up_node):
                graph.erase_node(erased)
            users = list(glu.users)
            down = _linear_call(users[0], module) if len(users) == 1 else None
            if down is not None and (id(down) not in fused or fused[id(down)].activation == "none"):
                downs[id(down)] = down
            else:
                down = None
            glus.append((gate, up, act, down))
            break
    for sub in module.modules():  # every reference to a down projection -> its FusedLinear
        for name, child in sub._modules.items():
            if id(child) in downs:
                fused.setdefault(id(child), FusedLinear.from_linear(child))
                sub._modules[name] = fused[id(child)]
    return bool(glus)


def _fuse_graph(module: nn.Module, graph: torch.fx.Graph, fused: Dict[int, FusedLinear], glus: list) -> None:
    """Fuse in the traced forward of module: the gated units first (_fuse_glus), then a Linear is fused when
    each of its calls feeds one activation only, the same one for every call."""
    before = len(glus)
    gated = _fuse_glus(module, graph, fused, glus) and len(glus) > before
    calls: Dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "call_module" and _replaceable(module.get_submodule(node.target), nn.Linear):
            calls.setdefault(node.target, []).append(node)
    pairs, linears = [], {}
    for target, nodes in calls.items():
        users = [next(iter(node.users)) if len(node.users) == 1 else None for node in nodes]
        acts = {_activation_of(user, module) if user is not None and user.args[0] is node else None
                for node, user in zip(nodes, users)}
        linear = module.get_submodule(target)
        known = fused.get(id(linear))
        if len(acts) == 1 and None not in acts and (known is None or known.activation in acts):
            linears[id(linear)] = (linear, acts.pop())
            pairs += list(zip(nodes, users))
    if not pairs:
        if gated:
            _rewrite_forward(module, graph)
        return
    # Activation modules the graph will no longer call become nn.Identity: the forward needs no change for those.
    erased = {act for _, act in pairs}
    called = {node.target for node in graph.nodes if node.op == "call_module" and node not in erased}
    removed = {act.target for act in erased if act.op == "call_module"} - called
    new_forward = any(act.op != "call_module" or act.target not in removed for act in erased)
    for linear, act in linears.values():
        _fused(linear, act, fused)
    # Every reference to a fused Linear inside module (the forward may call it by any of them) -> its fusion.
    for sub in module.modules():
        for name, child in sub._modules.items():
            if id(child) in linears:
                sub._modules[name] = fused[id(child)]
    for target in removed:
        parent, _, name = target.rpartition(".")
        setattr(module.get_submodule(parent), name, nn.Identity())
    if new_forward or gated:
        for node, act in pairs:
            act.replace_all_uses_with(node)
            graph.erase_node(act)
        _rewrite_forward(module, graph)


def _rewrite_forward(module: nn.Module, graph: torch.fx.Graph) -> None:
    """module's forward -> graph's code (its class -> a subclass of it with that forward)."""
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
