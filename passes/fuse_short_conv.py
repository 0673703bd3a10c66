"""fuse-short-conv: batched branch norms, a causal conv with left padding only, SiLU and the residual.

The reference normalizes each branch ``value[:, :, i]`` separately, concatenates them to G*D channels,
pads the depthwise conv by ``(k-1)*dilation`` on both sides and crops the outputs past T. Rewritten:
one RMSNormalization over [B,T,G,D] whose [G,D] scales are folded into the conv's weights, the conv
padded on the left only (nothing computed to be thrown away), then SiLU and ``value + conv(value)``.
The conv runs as a 2-D conv over [B, C, T, 1]: OpenVINO's CPU plugin turns the transposes around that
layout into cheaper reorders than around a 1-D conv (docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from engram_export.passes._graph import (
    Builder,
    Refused,
    RewritePass,
    attr,
    const,
    const_array,
    given,
    match_rms_norm,
    match_silu,
    other_input,
    producer,
    producer_of,
    replace_value,
)

__all__ = ["FuseShortConvPass"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ShortConv:
    value: ir.Value  # [B,T,G,D], the conv's input and the residual
    norm_weight: np.ndarray  # [G,D]
    eps: float
    conv: ir.Node
    residual: ir.Node  # the final Add


def _perm(node: ir.Node) -> list[int]:
    return attr(node, "perm", [])


def match_short_conv(residual: ir.Node) -> ShortConv:
    """From ``Add(value, Reshape(Transpose(SiLU(Slice(Conv(Transpose(Concat(norms))))))))``."""
    for value in residual.inputs:
        try:
            reshape = producer(other_input(residual, value), "Reshape")
            break
        except Refused:
            continue
    else:
        raise Refused("no Reshape feeding the residual Add")
    back = producer(reshape.inputs[0], "Transpose")
    crop = producer(match_silu(back.inputs[0]), "Slice")
    conv = producer(crop.inputs[0], "Conv")
    to_channels = producer(conv.inputs[0], "Transpose")
    if _perm(back) != [0, 2, 1] or _perm(to_channels) != [0, 2, 1]:
        raise Refused("unexpected layout around the conv")
    joined = to_channels.inputs[0]  # the branches' norms concatenated, or the one norm (hc_mult 1)
    concat = producer_of(joined)
    if concat is not None and concat.op_type == "Concat":
        if attr(concat, "axis") not in (-1, 2):
            raise Refused("branch norms concatenated on another axis")
        branches = list(concat.inputs)
    else:
        branches = [joined]
    norms = [match_rms_norm(v) for v in branches]
    selects = [producer(n.x, "Gather") for n in norms]
    if any(s.inputs[0] is not value or attr(s, "axis") != 2 for s in selects):
        raise Refused("the conv's branches are not value[:, :, i, :] of the residual's value")
    if [int(const_array(s.inputs[1], "branch index")) for s in selects] != list(range(len(selects))):
        raise Refused("branches are not concatenated in order 0..G-1")
    if len({n.eps for n in norms}) != 1:
        raise Refused("branch norms use different eps")
    value = given(value)
    _check_causal_crop(conv, crop, value)
    return ShortConv(value, np.stack([n.weight for n in norms]), norms[0].eps, conv, residual)


def _check_causal_crop(conv: ir.Node, crop: ir.Node, value: ir.Value) -> None:
    weight = const(conv.inputs[1])
    channels = weight.shape[0] if weight is not None else None
    if weight is None or weight.shape[1] != 1 or attr(conv, "group") != channels:
        raise Refused("the conv is not depthwise with constant weights")
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        raise Refused("the conv has a bias")
    kernel, dilation = weight.shape[2], attr(conv, "dilations", [1])[0]
    reach = (kernel - 1) * dilation
    if list(attr(conv, "pads", [0, 0])) != [reach, reach] or attr(conv, "strides", [1]) != [1]:
        raise Refused("the conv is not symmetrically padded by (k-1)*dilation")
    starts, axes = const(crop.inputs[1]), const(crop.inputs[3]) if len(crop.inputs) > 3 else None
    if starts is None or starts.tolist() != [0] or axes is None or axes.tolist() not in ([2], [-1]):
        raise Refused("the crop does not keep outputs from t = 0 on the time axis")
    end = producer(crop.inputs[2], "Shape")
    source = given(end.inputs[0])
    if (
        (attr(end, "start"), attr(end, "end")) != (1, 2)
        or source.shape is None
        or value.shape is None
        or source.shape[1] != value.shape[1]
    ):
        raise Refused("the crop does not keep exactly T outputs")


class FuseShortConvPass(RewritePass):
    """Rewrite the reference's short conv block into its causal, batched form."""

    anchor, pass_name = "Add", "fuse-short-conv"

    def match(self, node: ir.Node) -> ShortConv:
        return match_short_conv(node)

    def rewrite(self, model: ir.Model, found: ShortConv) -> None:
        self._fuse(model.graph, found)

    @staticmethod
    def _fuse(graph: ir.Graph, block: ShortConv) -> None:
        build = Builder(graph, "fused_short_conv")
        groups, dim = block.norm_weight.shape
        conv = block.conv
        kernel = const_array(conv.inputs[1], "conv weight").shape[2]
        dilation = attr(conv, "dilations", [1])[0]
        channels = groups * dim
        normed = build.rms_norm(block.value, block.eps, dim)
        # The norms' [G, D] scales fold into the depthwise conv's per-channel weights.
        weight = const(conv.inputs[1]) * block.norm_weight.reshape(channels, 1, 1)
        columns = build.op(
            "Transpose",
            build.op("Reshape", normed, build.constant("columns", np.array([0, 0, 1, channels], np.int64))),
            perm=[0, 3, 1, 2],
        )  # [B,C,T,1]
        mixed = build.op(
            "Conv",
            columns,
            build.constant("weight", weight[..., None]),
            group=channels,
            kernel_shape=[kernel, 1],
            dilations=[dilation, 1],
            pads=[(kernel - 1) * dilation, 0, 0, 0],
        )
        activated = build.op("Mul", mixed, build.op("Sigmoid", mixed))
        back = build.op(
            "Reshape",
            build.op("Transpose", activated, perm=[0, 2, 3, 1]),
            build.constant("shape", np.array([0, 0, groups, dim], np.int64)),
        )
        output = build.op("Add", block.value, back)
        build.insert_before(block.residual)
        replace_value(block.residual.outputs[0], output)
        log.info(
            "fuse-short-conv: %d branch norms and a cropped conv -> causal conv on %d channels", groups, groups * dim
        )
