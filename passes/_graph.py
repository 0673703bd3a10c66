"""Small matching and building helpers shared by the passes (onnx_ir values, nodes and constants)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

_log = logging.getLogger(__name__)

__all__ = [
    "RewritePass",
    "given",
    "const_array",
    "producer_of",
    "producer",
    "const",
    "scalar",
    "other_input",
    "attr",
    "RMSNorm",
    "match_rms_norm",
    "Builder",
    "Refused",
    "replace_value",
    "match_signed_sqrt_gate",
    "match_silu",
]


class Refused(Exception):
    """A pattern's check failed; the message says why (passes log it at debug level)."""


class RewritePass(ir.passes.InPlacePass):
    """Try ``match`` at every standard-domain node of type ``anchor`` (a type or a tuple of types);
    ``rewrite`` each match.

    ``match`` returns what ``rewrite`` needs or raises ``Refused`` with the reason, which is logged
    at debug level. The graph is re-sorted when something changed.
    """

    anchor: str | tuple[str, ...]
    pass_name: str

    def match(self, node: ir.Node):
        raise NotImplementedError

    def rewrite(self, model: ir.Model, found) -> None:
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            anchors = (self.anchor,) if isinstance(self.anchor, str) else self.anchor
            if node.op_type not in anchors or node.domain != "":
                continue
            try:
                found = self.match(node)
            except Refused as why:
                _log.debug("%s: %s refused: %s", self.pass_name, node.name, why)
                continue
            self.rewrite(model, found)
            modified = True
        if modified:
            model.graph.sort()
        return ir.passes.PassResult(model, modified=modified)


def producer(value: ir.Value | None, op_type: str) -> ir.Node:
    """The standard-domain node of ``op_type`` that produces ``value``, or ``Refused``."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        found = "an input" if node is None else node.op_type
        raise Refused(f"expected {op_type} producing {value.name if value else None}, found {found}")
    return node


def given(value: ir.Value | None, what: str = "input") -> ir.Value:
    """``value``, or ``Refused`` where the graph has none (an optional input left out)."""
    if value is None:
        raise Refused(f"no {what}")
    return value


def const(value: ir.Value | None) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def scalar(value: ir.Value | None) -> float:
    array = const(value)
    if array is None or array.size != 1:
        raise Refused(f"expected a scalar constant, got {value.name if value else None}")
    return array.item()


def const_array(value: ir.Value | None, what: str) -> np.ndarray:
    """The constant behind ``value``, or ``Refused``."""
    array = const(value)
    if array is None:
        raise Refused(f"{what} is not a constant")
    return array


def producer_of(value: ir.Value | None) -> ir.Node | None:
    """The node that makes ``value`` (None for a graph input or a missing value)."""
    return value.producer() if value is not None else None


def other_input(node: ir.Node, value: ir.Value | None) -> ir.Value:
    """The input of a binary node that is not ``value``."""
    first, second = node.inputs
    if first is value and second is not None:
        return second
    if second is value and first is not None:
        return first
    raise Refused(f"{node.op_type} does not read {value.name if value else None}")


def attr(node: ir.Node, name: str, default=None):
    """An attribute's value (sequences as lists), or ``default`` if the node has none."""
    attr = node.attributes.get(name)
    if attr is None:
        return default
    return list(attr.value) if isinstance(attr.value, tuple) else attr.value


@dataclasses.dataclass
class RMSNorm:
    """``x / sqrt(mean(x^2, -1) + eps) * weight``: an ``RMSNormalization`` over the last axis."""

    x: ir.Value
    weight: np.ndarray
    eps: float


def match_rms_norm(value: ir.Value | None) -> RMSNorm:
    """The ``RMSNormalization`` (last axis, constant 1-D scale) that produces ``value``."""
    node = producer(value, "RMSNormalization")
    weight = const(node.inputs[1])
    x = given(node.inputs[0])
    rank = len(x.shape) if x.shape is not None else None
    if attr(node, "axis", -1) not in (-1, (rank or 0) - 1):
        raise Refused("RMSNormalization is not over the last axis")
    if weight is None or weight.ndim != 1:
        raise Refused("RMSNormalization without a constant 1-D scale")
    return RMSNorm(x, weight, attr(node, "epsilon", 1e-5))


def match_signed_sqrt_gate(value: ir.Value | None) -> tuple[ir.Value, float]:
    """``Sigmoid(Sqrt(Clip(Abs(s), floor)) * Sign(s))`` ending at ``value``: returns (s, floor)."""
    signed = producer(producer(value, "Sigmoid").inputs[0], "Mul")
    sqrt_node = next(
        (node for v in signed.inputs if (node := producer_of(v)) is not None and node.op_type == "Sqrt"), None
    )
    if sqrt_node is None:
        raise Refused("gate: no signed square root")
    sign = producer(other_input(signed, sqrt_node.outputs[0]), "Sign")
    clip = producer(sqrt_node.inputs[0], "Clip")
    absolute = producer(clip.inputs[0], "Abs")
    if absolute.inputs[0] is not sign.inputs[0] or len(clip.inputs) != 2:
        raise Refused("gate: sign and magnitude of different values")
    return given(sign.inputs[0]), scalar(clip.inputs[1])


def match_silu(value: ir.Value | None) -> ir.Value:
    """``x * Sigmoid(x)`` ending at ``value``: returns x."""
    product = producer(value, "Mul")
    for x in product.inputs:
        other = other_input(product, x).producer()
        if x is not None and other is not None and other.op_type == "Sigmoid" and other.inputs[0] is x:
            return x
    raise Refused("no SiLU")


class Builder:
    """Records new nodes (via ``ir.tape.Tape``) and new initializers for one rewrite."""

    def __init__(self, graph: ir.Graph, prefix: str):
        self.graph, self.prefix = graph, prefix
        self.tape = ir.tape.Tape()

    def op(self, op_type: str, *inputs, **attributes) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attributes or None)

    def ops(self, op_type: str, *inputs, num_outputs: int, **attributes) -> list[ir.Value]:
        return list(self.tape.op_multi_out(op_type, list(inputs), attributes or None, num_outputs=num_outputs))

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        """A new initializer, named uniquely under the rewrite's prefix."""
        base, index = f"{self.prefix}.{name}", 0
        unique = base
        while unique in self.graph.initializers:
            index += 1
            unique = f"{base}_{index}"
        value = ir.Value(name=unique, const_value=ir.tensor(np.ascontiguousarray(array), name=unique))
        self.graph.register_initializer(value)
        return value

    def rms_norm(self, x: ir.Value, eps: float, dim: int) -> ir.Value:
        """``RMSNormalization`` over the last axis with a unit scale; callers fold per-branch scales
        into what follows. (OpenVINO runs it as one fused RMS kernel, ONNX Runtime natively.)"""
        ones = self.constant("unit_scale", np.ones(dim, np.float32))
        return self.op("RMSNormalization", x, ones, axis=-1, epsilon=float(eps))

    def insert_before(self, anchor: ir.Node) -> None:
        self.graph.insert_before(anchor, self.tape.nodes)


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Point every user of ``old`` (graph outputs too) at ``new``; a graph output keeps its name."""
    new.type, new.shape = old.type, old.shape
    was_output = old.is_graph_output()
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if was_output:
        name = old.name
        old.name = f"{name}.replaced"
        new.name = name
