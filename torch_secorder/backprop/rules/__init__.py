"""One rule per layer family (one file each); importing this package registers them all. A rule serves every
curvature and both engines (the chain engine's modules and the graph engine's module nodes)."""

from . import batch_norm, conv, conv_transpose, elementwise, embedding, layer_norm, linear, pooling, structural
from .registry import LayerRecord, PropagationContext, Rule, registered_base, registered_types, rule_for

FAMILIES = (batch_norm, conv, conv_transpose, elementwise, embedding, layer_norm, linear, pooling, structural)

__all__ = ["LayerRecord", "PropagationContext", "Rule", "registered_base", "registered_types", "rule_for"]
