"""Feature taps: named intermediate tensors of any model, taken with forward hooks.

A tap spec names a module by its path in ``model.named_modules()``:

* ``"layer3"`` or ``"layer3:output"``: the module's output;
* ``"fc:input"``: the module's first positional input, e.g. the pooled embedding fed to the
  classifier, taken without rewriting ``forward``;
* ``""`` is the model itself.

Tap *names* are what losses ask for (``"penultimate"``, ``"stage2"``); :func:`resolve_taps` maps
them to specs through ``model.default_taps``, and a spec passes through as its own name.

>>> taps = FeatureTaps(model, resolve_taps(model, ["penultimate", "layer3"]))
>>> logits = model(x)
>>> taps.features["penultimate"].shape     # (B, D), still part of the autograd graph
>>> taps.remove()
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from relkd.registry import suggest

__all__ = ["FeatureTaps", "default_taps", "infer_default_taps", "parse_spec", "resolve_taps"]

_WHERE = ("output", "input")
LOGITS = "logits"


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a tap spec into ``(module path, "output" | "input")``.

    Raises:
        ValueError: the part after ``:`` is neither ``input`` nor ``output``.
    """
    path, sep, where = spec.partition(":")
    if not sep:
        where = "output"
    if where not in _WHERE:
        raise ValueError(
            f"tap spec {spec!r} ends in {':' + where!r}; write 'path' or 'path:output' for a "
            "module's output, 'path:input' for its first positional input"
        )
    return path, where


def _no_module(model: nn.Module, path: str, extra: Iterable[str] = (), what: str = "module") -> KeyError:
    names = [*extra, *(n for n, _ in model.named_modules() if n)]
    hint = suggest(path, names)
    if not hint:
        hint = " Its top-level modules: " + ", ".join(n for n, _ in model.named_children()) + "."
    return KeyError(f"{type(model).__name__} has no {what} {path!r}.{hint}")


def find_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` (``""`` is ``model``).

    Raises:
        KeyError: no such module; the message names the closest module paths.
    """
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise _no_module(model, path) from None


def infer_default_taps(model: nn.Module) -> dict[str, str]:
    """Default taps read from the module tree, for models that do not declare ``default_taps``.

    ``penultimate`` is the input of the last ``nn.Linear`` in registration order (the classifier of
    torchvision models and of most user models); ``stage1`` .. ``stage4`` are the children
    ``layer1`` .. ``layer4`` of ResNet-like models, and ``feature_map`` (the last map before pooling)
    the last of them, or else a child named ``features`` (torchvision's VGG, MobileNets, EfficientNets,
    DenseNets). Names that cannot be inferred are left out.
    """
    children = dict(model.named_children())
    taps = {f"stage{i}": f"layer{i}" for i in range(1, 5) if f"layer{i}" in children}
    if taps:
        taps["feature_map"] = taps[max(taps)]
    elif "features" in children:
        taps["feature_map"] = "features"
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        taps["penultimate"] = f"{linears[-1]}:input"
    return taps


def default_taps(model: nn.Module) -> dict[str, str]:
    """``model.default_taps`` when the model declares them, else :func:`infer_default_taps`."""
    taps = getattr(model, "default_taps", None)
    return dict(taps) if taps is not None else infer_default_taps(model)


def resolve_taps(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Map tap names to specs: a default tap name through ``model.default_taps``, a spec to itself.

    >>> resolve_taps(resnet, ["penultimate", "layer2.0", "layer3:input"])
    {'penultimate': 'fc:input', 'layer2.0': 'layer2.0', 'layer3:input': 'layer3:input'}

    Raises:
        ValueError: ``"logits"`` was asked for; it is the forward's return value, not a hook.
        KeyError: a name is neither a default tap nor a module path; the message names the
            closest of both.
    """
    defaults = default_taps(model)
    resolved = {}
    for name in names:
        if name == LOGITS:
            raise ValueError(
                "'logits' is not a hooked feature: it is the model's return value; "
                "take it from model(x) and resolve only the other taps"
            )
        if name in defaults:
            resolved[name] = defaults[name]
            continue
        path, _ = parse_spec(name)
        try:
            model.get_submodule(path)
        except AttributeError:
            err = _no_module(model, path, extra=defaults, what="default tap or module")
            raise KeyError(
                f"{err.args[0]} Default taps: {', '.join(defaults) or 'none'}; a tap is one of "
                "them or a module path (optionally ':input')."
            ) from None
        resolved[name] = name
    return resolved


class FeatureTaps:
    """Forward hooks that record named features of ``model`` at each forward.

    ``features`` is replaced by a fresh dict at the start of every forward of ``model``, so no
    tensor outlives the step that made it, and it holds what the hooks saw: the tensors
    themselves, part of the autograd graph when grad is enabled (no copy, no detach). A module
    called several times in one forward keeps its last call.

    Args:
        model: the network; hook the unwrapped module, not a ``DistributedDataParallel`` wrapper
            (whose paths start with ``module.``).
        taps: tap name -> spec (see the module docstring), e.g. from :func:`resolve_taps`.

    Raises:
        KeyError: a spec names no module of ``model`` (the message names the closest ones).
        ValueError: a spec is malformed.

    Use it as a context manager, or call :meth:`remove` when done::

        with FeatureTaps(model, {"emb": "fc:input"}) as taps:
            logits = model(x)
            emb = taps["emb"]
    """

    def __init__(self, model: nn.Module, taps: Mapping[str, str]) -> None:
        self.model = model
        self.taps = dict(taps)
        self.features: dict[str, Any] = {}
        # Resolve every spec before hooking anything, so a bad spec leaves the model untouched.
        targets = [(name, *_target(model, spec)) for name, spec in self.taps.items()]
        self._handles = [model.register_forward_pre_hook(self._clear)]
        for name, module, where in targets:
            if where == "input":
                hook = module.register_forward_pre_hook(functools.partial(self._store_input, name))
            else:
                hook = module.register_forward_hook(functools.partial(self._store_output, name))
            self._handles.append(hook)

    def _clear(self, module: nn.Module, args: tuple) -> None:
        self.features = {}

    def _store_input(self, name: str, module: nn.Module, args: tuple) -> None:
        if not args:
            raise RuntimeError(
                f"tap {name!r} ({self.taps[name]!r}) reads the first positional input of "
                f"{type(module).__name__}, but it was called with keyword arguments only; "
                "tap the output of the module before it instead"
            )
        self.features[name] = args[0]

    def _store_output(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        self.features[name] = output

    def __getitem__(self, name: str) -> Any:
        if name not in self.features:
            if name not in self.taps:
                raise KeyError(f"no tap named {name!r}.{suggest(name, self.taps)}")
            raise KeyError(
                f"tap {name!r} ({self.taps[name]!r}) has no value: run a forward of the model "
                "first, or check that the forward reaches that module"
            )
        return self.features[name]

    def remove(self) -> None:
        """Remove every hook and drop the recorded features (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features = {}

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._handles else "removed"
        return f"FeatureTaps({type(self.model).__name__}, {self.taps}, {state})"


def _target(model: nn.Module, spec: str) -> tuple[nn.Module, str]:
    path, where = parse_spec(spec)
    return find_module(model, path), where
