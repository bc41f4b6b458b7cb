"""A restricted unpickler for legacy (seed notebook / sgrvinod tutorial) checkpoints.

Those files pickle whole ``nn.Module`` and ``torch.optim.Adam`` objects, so ``weights_only=True``
refuses them and plain ``torch.load`` would import and run whatever the pickle names. This module
is passed to ``torch.load(..., weights_only=False, pickle_module=<this module>)``: torch keeps
its storage handling (zip and pre-1.6 formats, ``map_location``), and every global the pickle
names goes through :meth:`RestrictedUnpickler.find_class`, which resolves only a fixed table:

* the seed's and the tutorial's model classes, torchvision's ResNet blocks, the ``torch.nn``
  layers those models use and ``torch.optim.Adam`` become :class:`StandIn` subclasses: inert
  records of the pickled ``__dict__`` (no ``__init__``/``__setstate__`` of the real class runs,
  nothing is imported);
* tensor/parameter rebuild functions, ``OrderedDict``, ``set``, ``dict`` are the real, data-only
  objects; ``defaultdict`` becomes a plain dict.

Anything else raises :class:`RefusedGlobal` naming it (e.g. ``posix.system``). The opcodes that
call or mutate objects (REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ, BUILD) are re-checked too, so an
allowed function cannot be reached in a way that changes process state.

Built on the pure-Python ``pickle._Unpickler`` (stable for decades in CPython) because its
per-opcode dispatch table can be overridden; the C unpickler only exposes ``find_class``.
The pickle part of a checkpoint is small (the tensor bytes live outside it), so speed is fine.
"""

from __future__ import annotations

import _compat_pickle
import pickle
from collections import OrderedDict
from typing import Any, ClassVar

import torch


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names (or tries to call/modify) something outside the allowlist."""

    def __init__(self, global_name: str, why: str = "not an allowed global"):
        super().__init__(f"refused {global_name!r}: {why}")
        self.global_name = global_name


class StandIn:
    """Inert record of one pickled object: ``path`` is the class it claimed, ``state`` its state.

    For ``nn.Module`` objects ``state`` is the module ``__dict__`` (``_modules``, ``_parameters``,
    ``_buffers``, hyper-parameters); for Adam it is ``{'defaults', 'state', 'param_groups'}``.
    """

    path: ClassVar[str] = "?"
    dump_patches: ClassVar[bool] = False  # read by torch's pre-1.6 loader when a module's source changed

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def attrs(self) -> dict:
        """The pickled ``__dict__`` (the slot-state part of a ``(dict, slots)`` state is ignored)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        return state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<StandIn {self.path}>"


def _make_stand_in(path: str) -> type[StandIn]:
    return type(path.rsplit(".", 1)[1], (StandIn,), {"path": path, "__module__": __name__})


# Class paths the legacy checkpoints pickle. The seed notebook defines its classes in __main__;
# the tutorial's live in models.py. ResNet itself is not in the tree (the encoders keep only
# its children) but is listed because the brief and any un-sliced variant would need it.
SEED_CLASSES = ("__main__.ImageEncoder", "__main__.DecoderWithAttention", "__main__.BahdanauAttention")
TUTORIAL_CLASSES = ("models.Encoder", "models.DecoderWithAttention", "models.Attention")
LIBRARY_CLASSES = (
    "torchvision.models.resnet.ResNet",
    "torchvision.models.resnet.Bottleneck",
    "torchvision.models.resnet.BasicBlock",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.activation.Sigmoid",
    "torch.nn.modules.activation.Softmax",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.sparse.Embedding",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.rnn.LSTMCell",
    "torch.optim.adam.Adam",
)
STAND_INS: dict[str, type[StandIn]] = {p: _make_stand_in(p) for p in SEED_CLASSES + TUTORIAL_CLASSES + LIBRARY_CLASSES}


def _plain_dict(default_factory: Any = None) -> dict:
    """Stand-in for ``collections.defaultdict`` (Adam's ``state``): a plain dict, the factory is dropped."""
    return {}


def _no_backend() -> None:
    """Stand-in for PyTorch <= 1.0's ``_get_thnn_function_backend``, pickled as every module's ``_backend``."""
    return None


# Real objects that only build data. The tensor rebuild functions are the ones torch's own
# weights_only unpickler trusts; storages ("torch.FloatStorage", ...) are resolved by torch's
# wrapper around this unpickler before find_class is reached.
DATA_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "collections.defaultdict": _plain_dict,
    "builtins.set": set,
    "builtins.dict": dict,
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
    "torch.nn.backends.thnn._get_thnn_function_backend": _no_backend,
}

ALLOWED_GLOBALS: dict[str, Any] = {**STAND_INS, **DATA_GLOBALS}
_CALLABLE_IDS = frozenset(id(obj) for obj in ALLOWED_GLOBALS.values())


def _describe(obj: Any) -> str:
    if isinstance(obj, type) and issubclass(obj, StandIn):
        return obj.path
    name = getattr(obj, "__qualname__", None)
    if isinstance(name, str):
        return f"{getattr(obj, '__module__', '?')}.{name}"
    return f"{type(obj).__module__}.{type(obj).__qualname__} object"


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Unpickler that resolves globals only from ALLOWED_GLOBALS and builds only StandIns."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as pickle.Unpickler maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        path = f"{module}.{name}"
        try:
            return ALLOWED_GLOBALS[path]
        except KeyError:
            raise RefusedGlobal(path) from None

    @staticmethod
    def _check_callable(func: Any, opcode: str) -> None:
        if id(func) not in _CALLABLE_IDS:
            raise RefusedGlobal(_describe(func), f"{opcode} may only call allowed globals")

    def load_reduce(self) -> None:
        self._check_callable(self.stack[-2], "REDUCE")
        super().load_reduce()

    def load_newobj(self) -> None:
        cls = self.stack[-2]
        if not (isinstance(cls, type) and issubclass(cls, StandIn) and id(cls) in _CALLABLE_IDS):
            raise RefusedGlobal(_describe(cls), "NEWOBJ may only create stand-ins")
        args = self.stack.pop()
        self.stack.pop()
        self.append(cls(*args))

    def load_newobj_ex(self) -> None:
        raise RefusedGlobal(_describe(self.stack[-3]), "NEWOBJ_EX is never written by torch.save")

    def _instantiate(self, klass: Any, args: tuple) -> None:  # INST and OBJ (protocols 0/1)
        self._check_callable(klass, "INST/OBJ")
        super()._instantiate(klass, args)

    def load_build(self) -> None:
        state = self.stack[-1]
        inst = self.stack[-2]
        if isinstance(inst, StandIn):
            self.stack.pop()
            inst.__setstate__(state)
        elif type(inst) is OrderedDict and isinstance(state, dict):
            self.stack.pop()
            inst.__dict__.update(state)  # attributes of an OrderedDict are data, nothing runs
        else:
            raise RefusedGlobal(_describe(inst), "BUILD may only fill stand-ins")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


# torch.load uses these two names of its pickle_module (Unpickler for the payload, load for
# the pre-1.6 format's header records), so this module itself is the pickle_module.
Unpickler = RestrictedUnpickler


def load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()
