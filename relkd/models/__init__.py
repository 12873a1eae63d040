"""Models: the CIFAR knowledge-distillation zoo, small models, torchvision by name, feature taps.

>>> from relkd import models
>>> net = models.create("resnet8x4", num_classes=100)
>>> models.available("wrn*")
['wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2']
>>> net.default_taps["penultimate"]
'fc:input'
"""

from relkd.models.zoo import MODELS, available, create, register  # isort: skip (defines the registry)
from relkd.models import (  # noqa: F401  (importing a family registers its constructors)
    mobilenetv2,
    resnet_bottleneck,
    resnet_cifar,
    shufflenetv1,
    shufflenetv2,
    small,
    text,
    vgg,
    wrn,
)
from relkd.models.taps import (
    FeatureTaps,
    default_taps,
    infer_default_taps,
    parse_spec,
    resolve_taps,
)

__all__ = [
    "MODELS",
    "FeatureTaps",
    "available",
    "create",
    "default_taps",
    "infer_default_taps",
    "parse_spec",
    "register",
    "resolve_taps",
]
