"""ckbn.fuse: replace each BatchNorm whose only consumer is an activation by one fused module.

Every module of the model that has a BatchNorm among its children is looked at on its own, children
first:

* an ``nn.Sequential`` (running Sequential's own forward): a BatchNorm directly followed by an
  activation module. The BatchNorm's slot takes the fused module, the activation's an ``nn.Identity``;
  the container keeps its class and indices.
* any other module: its own forward is traced by ``torch.fx`` with every child kept as a call. A
  BatchNorm child called once, whose output goes to an activation (module, ``F.relu``/``torch.relu``
  style functions, in-place variants, ``x.relu_()``) and nowhere else, is fused. The module keeps its
  class, children (its activation modules too) and attributes; its forward becomes the traced one
  without the activation call, set on the instance. A forward that torch.fx cannot trace, or whose
  trace depends on ``self.training``, is left as it is.
* timm's ``BatchNormAct2d`` converts to :class:`ckbn.BatchNormAct2d` with its weights.

The fused modules share the BatchNorm's parameters and buffers (the same tensors, so an optimizer
built before keeps working), so the state_dict is unchanged. Every BatchNorm left unfused is reported
with the reason; :func:`fuse` logs the report on the ``ckbn.fusion`` logger.
"""

from __future__ import annotations

import importlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from types import ModuleType
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import activations, modules, surgery
from .norm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d

logger = logging.getLogger(__name__)

_FUSED_CLASS = {
    nn.BatchNorm1d: BatchNormAct1d,
    nn.BatchNorm2d: BatchNormAct2d,
    nn.BatchNorm3d: BatchNormAct3d,
    modules.BatchNorm1d: BatchNormAct1d,
    modules.BatchNorm2d: BatchNormAct2d,
    modules.BatchNorm3d: BatchNormAct3d,
}

_ACTIVATION_MODULES = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
}

# Callable -> (activation, the names of its arguments after the input, in order).
_ACTIVATION_FUNCTIONS = {
    F.relu: ("relu", ("inplace",)),
    torch.relu: ("relu", ()),
    torch.relu_: ("relu", ()),
    F.relu6: ("relu6", ("inplace",)),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
    F.leaky_relu_: ("leaky_relu", ("negative_slope",)),
    F.silu: ("silu", ("inplace",)),
    F.hardswish: ("hardswish", ("inplace",)),
}
_ACTIVATION_METHODS = {"relu": ("relu", ()), "relu_": ("relu", ())}

Activation = Tuple[str, float]  # as activations.canonical gives it


@dataclass
class FusionReport:
    """What :func:`fuse` did, by the BatchNorms' qualified names in the model it was given."""

    fused: Dict[str, str] = field(default_factory=dict)  # name -> the activation it now computes
    left: Dict[str, str] = field(default_factory=dict)  # name -> why it was not fused

    def __str__(self) -> str:
        lines = [f"ckbn.fuse: {len(self.fused)} BatchNorm + activation pairs fused, {len(self.left)} BatchNorms left"]
        lines += [f"  left {name}: {reason}" for name, reason in self.left.items()]
        return "\n".join(lines)


def fuse(model: nn.Module, *, return_report: bool = False) -> Union[nn.Module, Tuple[nn.Module, FusionReport]]:
    """Fuse every BatchNorm of ``model`` whose only consumer is an activation into one
    :class:`ckbn.BatchNormAct2d` (1d, 3d); see the module docstring for how they are found.

    Returns the fused model (a new object only when ``model`` itself is replaced), or
    ``(model, FusionReport)`` with ``return_report=True``. Outputs, gradients and running statistics
    are those of the unfused model; the fused modules run ckbn's operators, so their running
    statistics stay exact under checkpointing. BatchNorms left unfused keep their class: use
    ``ckbn.convert_model(model, fuse_activations=True)`` to convert those too.
    """
    names: Dict[int, str] = {}
    default_reasons: Dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            names.setdefault(id(module), name or "(the model itself)")
            fusable = type(module) in _FUSED_CLASS or surgery.is_timm_layer(module, "BatchNormAct2d")
            # The same words as convert_model's for a layer ckbn cannot take over.
            default_reasons[id(module)] = (
                "not called from a forward that fuse() could analyse"
                if fusable
                else surgery.why_not_convertible(module)
                or f"{type(module).__name__} is not a BatchNorm class that fuse() replaces"
            )
    fuser = _Fuser()
    model = fuser.visit(model)
    report = FusionReport()
    for key, name in names.items():
        if key in fuser.fused:
            report.fused[name] = fuser.fused[key]
        else:
            report.left[name] = fuser.reasons.get(key, default_reasons[key])
    logger.info("%s", report)
    return (model, report) if return_report else model


def _has_hooks(module: nn.Module) -> bool:
    return any(
        getattr(module, hooks, None)
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def _label(activation: Activation) -> str:
    """How the report names a fused activation: leaky_relu with its slope."""
    name, param = activation
    return name if name != "leaky_relu" else f"leaky_relu({param})"


def _checked(name: str, param) -> Optional[Activation]:
    try:
        return activations.canonical(name, param)
    except ValueError:  # e.g. a slope that is not a number
        return None


def _activation_of_module(module: nn.Module) -> Optional[Activation]:
    name = _ACTIVATION_MODULES.get(type(module))  # exact types: a subclass may compute something else
    if name is None or _has_hooks(module):
        return None
    return _checked(name, module.negative_slope if name == "leaky_relu" else None)


def _bound_arguments(node: fx.Node, input: fx.Node, parameter_names) -> Optional[dict]:
    """``node``'s arguments after ``input`` by name, or None unless ``input`` is its first argument
    and every other one is a constant from ``parameter_names``."""
    if not node.args or node.args[0] is not input or len(node.args) - 1 > len(parameter_names):
        return None
    bound = dict(zip(parameter_names, node.args[1:]))
    for key, value in node.kwargs.items():
        if key not in parameter_names or key in bound:
            return None
        bound[key] = value
    if any(isinstance(value, fx.Node) for value in bound.values()):
        return None
    return bound


def _activation_of_node(node: fx.Node, input: fx.Node, owner: nn.Module) -> Optional[Activation]:
    """The activation ``node`` applies to ``input`` alone, or None."""
    if node.op == "call_module":
        if node.args != (input,) or node.kwargs:
            return None
        return _activation_of_module(owner.get_submodule(node.target))
    table = {"call_function": _ACTIVATION_FUNCTIONS, "call_method": _ACTIVATION_METHODS}.get(node.op, {})
    try:
        name, parameter_names = table[node.target]
    except (KeyError, TypeError):  # TypeError: an unhashable target
        return None
    bound = _bound_arguments(node, input, parameter_names)
    if bound is None:
        return None
    return _checked(name, bound.get("negative_slope"))


def _describe(node: fx.Node, owner: nn.Module) -> str:
    if node.op == "call_module":
        return type(owner.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return f"the {node.op} of the forward"


class _OwnForwardTracer(fx.Tracer):
    """Traces one module's own forward: every submodule call stays a call."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


def _trace(module: nn.Module) -> fx.Graph:
    graph = _OwnForwardTracer().trace(module)
    module.training = not module.training  # a forward that reads self.training cannot be frozen
    try:
        other_mode = _OwnForwardTracer().trace(module)
    finally:
        module.training = not module.training
    if other_mode.python_code("self").src != graph.python_code("self").src:
        raise RuntimeError("its traced forward depends on self.training")
    return graph


def fuse_timm_batch_norm_act(module: nn.Module) -> Tuple[Optional[nn.Module], str]:
    """``(ckbn.BatchNormAct2d, what it computes)`` for timm's BatchNormAct2d ``module``, sharing its
    tensors, or ``(None, why not)`` when its drop or activation is not one ckbn fuses."""
    activation = _activation_of_module(module.act)
    if type(module.drop) is not nn.Identity:
        return None, f"timm BatchNormAct2d with drop={type(module.drop).__name__}: ckbn fuses no dropout"
    if _has_hooks(module):
        return None, "timm BatchNormAct2d with hooks, which a new module would not have"
    if type(module.act) is not nn.Identity and activation is None:
        return None, f"timm BatchNormAct2d with act={type(module.act).__name__}: not an activation ckbn fuses"
    name, param = activation or ("identity", 0.0)
    fused = surgery.transplant(module, BatchNormAct2d, activation=name, activation_param=param)
    return fused, _label((name, param))


class _Fuser:
    def __init__(self) -> None:
        self.fused: Dict[int, str] = {}  # id of an original BatchNorm -> its activation
        self.reasons: Dict[int, str] = {}  # id of an original BatchNorm -> why it is not fused
        self.memo: Dict[int, nn.Module] = {}  # a module shared in several places is replaced once

    def visit(self, module: nn.Module) -> nn.Module:
        if id(module) in self.memo:
            return self.memo[id(module)]
        for name, child in list(module.named_children()):
            replacement = self.visit(child)
            if replacement is not child:
                setattr(module, name, replacement)
        if surgery.is_timm_layer(module, "BatchNormAct2d"):
            result = self.convert_timm(module)
        elif not any(type(child) in _FUSED_CLASS for child in module.children()):
            result = module
        elif "forward" in vars(module):
            self.leave(module.children(), f"{type(module).__name__}'s forward is set on the instance (fused already?)")
            result = module
        elif type(module).forward is nn.Sequential.forward:
            result = self.fuse_sequential(module)
        elif type(module).forward is nn.Module.forward:
            self.leave(module.children(), f"its container {type(module).__name__} has no forward of its own")
            result = module
        else:
            result = self.fuse_traced(module)
        self.memo[id(module)] = result
        return result

    def leave(self, children, reason: str) -> None:
        for child in children:
            if type(child) in _FUSED_CLASS:
                self.reasons[id(child)] = reason

    def fused_module(self, batch_norm: nn.Module, activation: Activation, cls=None) -> nn.Module:
        name, param = activation
        self.fused[id(batch_norm)] = _label(activation)
        cls = cls or _FUSED_CLASS[type(batch_norm)]
        return surgery.transplant(batch_norm, cls, activation=name, activation_param=param)

    def fuse_sequential(self, sequential: nn.Sequential) -> nn.Sequential:
        keys = list(sequential._modules)
        for key, next_key in zip(keys, keys[1:] + [None]):
            batch_norm = sequential._modules[key]
            if type(batch_norm) not in _FUSED_CLASS:
                continue
            following = sequential._modules[next_key] if next_key is not None else None
            activation = _activation_of_module(following) if following is not None else None
            if following is None:
                self.reasons[id(batch_norm)] = (
                    f"last in its {type(sequential).__name__}: the activation, if any, is outside"
                )
            elif activation is None or _has_hooks(batch_norm):
                self.reasons[id(batch_norm)] = f"followed by {type(following).__name__}, not a fusable activation"
            else:
                sequential._modules[key] = self.fused_module(batch_norm, activation)
                sequential._modules[next_key] = nn.Identity()
        return sequential

    def fuse_traced(self, module: nn.Module) -> nn.Module:
        owner = type(module).__name__
        try:
            graph = _trace(module)
        except Exception as error:  # whatever fx raises: the module then stays as it is
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self.leave(module.children(), f"{owner}.forward cannot be traced by torch.fx ({message[:120]})")
            return module

        calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
        replacements: Dict[str, nn.Module] = {}
        for node in list(graph.nodes):
            if node.op != "call_module" or type(module.get_submodule(node.target)) not in _FUSED_CLASS:
                continue
            batch_norm = module.get_submodule(node.target)
            users = list(node.users)
            activation = _activation_of_node(users[0], node, module) if len(users) == 1 else None
            if "." in node.target:
                reason = f"called as self.{node.target} from {owner}.forward; only a module's own children are fused"
            elif calls[node.target] > 1:
                reason = f"called {calls[node.target]} times in {owner}.forward"
            elif len(users) != 1:
                reason = f"its output has {len(users)} consumers in {owner}.forward"
            elif activation is None or _has_hooks(batch_norm):
                reason = f"its output goes to {_describe(users[0], module)}, not a fusable activation"
            else:
                replacements[node.target] = self.fused_module(batch_norm, activation)
                users[0].replace_all_uses_with(node)
                graph.erase_node(users[0])
                continue
            self.reasons[id(batch_norm)] = reason
        if replacements:
            graph.lint()
            for name, fused in replacements.items():
                setattr(module, name, fused)
            module.forward = _TracedForward(module, graph)
        return module

    def convert_timm(self, module: nn.Module) -> nn.Module:
        fused, activation = fuse_timm_batch_norm_act(module)
        if fused is None:
            self.reasons[id(module)] = activation
            return module
        if activation == "identity":
            self.reasons[id(module)] = "timm BatchNormAct2d without activation (now ckbn.BatchNormAct2d, identity)"
        else:
            self.fused[id(module)] = activation
        return fused


class _TracedForward:
    """A module's forward as torch.fx traced it, with the fused activation calls removed.

    Set as the module's instance attribute ``forward``, so the module keeps its class, attributes and
    children (the activation modules included). The code is kept as source, compiled on first use,
    so that the module can be deep-copied and pickled.
    """

    def __init__(self, module: nn.Module, graph: fx.Graph) -> None:
        code = graph.python_code(root_module="self")
        self.module = module
        self.source = code.src
        self.imports = {name: value.__name__ for name, value in code.globals.items() if isinstance(value, ModuleType)}
        self.constants = {name: value for name, value in code.globals.items() if name not in self.imports}
        self._function = None

    def __call__(self, *args, **kwargs):
        if self._function is None:
            namespace = {name: importlib.import_module(module) for name, module in self.imports.items()}
            namespace.update(self.constants)
            exec(compile(self.source, f"<ckbn.fuse: {type(self.module).__name__}.forward>", "exec"), namespace)
            self._function = namespace["forward"]
        return self._function(self.module, *args, **kwargs)

    def __getstate__(self) -> dict:
        return {**vars(self), "_function": None}


__all__ = ["FusionReport", "fuse", "fuse_timm_batch_norm_act"]
