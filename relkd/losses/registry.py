"""The loss registry: ``relkd.losses.build("rkd", **kw)``, ``relkd.losses.available()``."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from relkd.registry import Registry

LOSSES = Registry("loss")
register = LOSSES.register


def build(
    name: str,
    /,
    *,
    student: Any = None,
    teacher: Any = None,
    example: Any = None,
    num_data: int | None = None,
    targets: Any = None,
    num_classes: int | None = None,
    **kwargs: Any,
):
    """Build a registered loss module by name, e.g. ``build("cc", gamma=0.4)``.

    With ``student``, ``teacher`` (networks) and ``example`` (a batch of their inputs) the sizes the loss
    asks for (embedding widths, channels, shapes of its taps) are measured by running both networks once
    on ``example`` in eval mode with forward hooks on the loss's taps, as the experiment engine does::

        crd = relkd.losses.build("crd", student=student, teacher=teacher, example=x[:8],
                                 num_data=len(train_set), targets=train_labels)

    ``num_data``, ``targets`` (labels of the whole training set, ``-1`` where unknown) and
    ``num_classes`` are passed on to losses that ask for them; ``kwargs`` are the loss's options.
    """
    known = {"num_data": num_data, "targets": targets, "num_classes": num_classes}
    cls = LOSSES.get(name)
    if student is None and teacher is None and example is None:
        params = inspect.signature(cls).parameters
        return cls(**kwargs, **{k: v for k, v in known.items() if v is not None and k in params})
    if student is None or example is None or (teacher is None and cls.needs_teacher):
        raise ValueError(
            f"build({name!r}): measuring sizes needs student=, example= and (for a loss with a teacher) "
            "teacher=; give all of them, or none and the sizes as options"
        )
    from relkd.losses.sizes import measured_sizes
    from relkd.models import FeatureTaps, resolve_taps

    taps = tuple(kwargs.pop("taps", cls.taps))
    features = []
    for network in (student, teacher):
        if network is None:
            features.append(None)
            continue
        wanted = [t for t in taps if t != "logits"]
        was_training = network.training
        network.eval()
        try:
            with torch.no_grad(), FeatureTaps(network, resolve_taps(network, wanted)) as hooked:
                logits = network(example)
                features.append({**hooked.features, "logits": logits})
        finally:
            network.train(was_training)
    sizes = measured_sizes(cls, features[0], features[1], taps, given=kwargs, **known)
    module = cls(**sizes, **kwargs)
    module.taps = taps
    return module


def available(pattern: str = "*") -> list[str]:
    """Names of the registered losses (shell-style ``pattern``)."""
    return LOSSES.available(pattern)
