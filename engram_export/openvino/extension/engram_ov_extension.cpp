// OpenVINO extension for Engram: the registration of the ops (one per file: hash.hpp,
// gated_short_conv.hpp, gather_rows.hpp; table_tier.hpp holds no op, the tiers EngramGatherRows reads
// through) and the ONNX frontend conversions of the engram domain's nodes into them.
// engram.HashGatherFP8 becomes EngramHash(blocking=1) + standard Gathers and FP8/E8M0 decoding of the
// table's rows, engram.HashGatherBlocked (a BF16 or F32 table) EngramHash(blocking=1) + Gather + Convert
// to f32; the runtime later reads those tables with EngramGatherRows (openvino/row_kernel.py).

#include <cmath>
#include <memory>
#include <vector>

#include "gated_short_conv.hpp"
#include "gather_rows.hpp"
#include "hash.hpp"
#include "openvino/core/extension.hpp"
#include "openvino/core/op_extension.hpp"
#include "openvino/frontend/onnx/extension/conversion.hpp"
#include "openvino/op/constant.hpp"
#include "openvino/op/convert.hpp"
#include "openvino/op/gather.hpp"
#include "openvino/op/multiply.hpp"
#include "openvino/op/reshape.hpp"
#include "openvino/op/unsqueeze.hpp"

namespace engram {

// engram.HashGather(input_ids, compress_lut, table) -> EngramHash rows -> Gather(table) -> [B, T, H*d]
ov::OutputVector convert_hash_gather(const ov::frontend::NodeContext& node) {
    auto rows = std::make_shared<EngramHash>(ov::OutputVector{node.get_input(0), node.get_input(1)},
                                             node.get_attribute<std::vector<int64_t>>("multipliers"),
                                             node.get_attribute<std::vector<int64_t>>("primes"),
                                             node.get_attribute<int64_t>("pad_id"),
                                             node.get_attribute<int64_t>("n_head_per_ngram"));
    auto axis = ov::op::v0::Constant::create(ov::element::i32, ov::Shape{}, {0});
    auto gathered = std::make_shared<ov::op::v8::Gather>(node.get_input(2), rows, axis);
    auto flat = ov::op::v0::Constant::create(ov::element::i64, ov::Shape{3}, {0, 0, -1});
    return {std::make_shared<ov::op::v1::Reshape>(gathered, flat, true)};
}

// 256-entry f32 decode tables of the FP8 bytes (as models/deepseek_v41.py's e4m3_values, e8m0_values)
static std::vector<float> e4m3_values() {
    std::vector<float> values(256);
    for (int byte = 0; byte < 256; ++byte) {
        const int exponent = (byte >> 3) & 0xF, mantissa = byte & 0x7;
        const float magnitude = exponent == 0xF && mantissa == 0x7 ? NAN
                                : exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -9)
                                                : std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);
        values[byte] = byte & 0x80 ? -magnitude : magnitude;
    }
    return values;
}

static std::vector<float> e8m0_values() {
    std::vector<float> values(256);
    for (int byte = 0; byte < 255; ++byte) values[byte] = std::ldexp(1.0f, byte - 127);
    values[255] = NAN;
    return values;
}

// codes (u8) -> f32 values through a 256-entry table
static ov::Output<ov::Node> decode_bytes(const ov::Output<ov::Node>& codes, const std::vector<float>& table) {
    auto values = ov::op::v0::Constant::create(ov::element::f32, ov::Shape{256}, table);
    auto indices = std::make_shared<ov::op::v0::Convert>(codes, ov::element::i32);
    auto axis = ov::op::v0::Constant::create(ov::element::i32, ov::Shape{}, {0});
    return std::make_shared<ov::op::v8::Gather>(values, indices, axis);
}

// The V4.1 rows [B,T,C] of a HashGatherFP8 / HashGatherBlocked node (input_ids, token_mask, compress_lut, ..)
static std::shared_ptr<EngramHash> blocked_rows(const ov::frontend::NodeContext& node) {
    return std::make_shared<EngramHash>(
        ov::OutputVector{node.get_input(0), node.get_input(2), node.get_input(1)},
        node.get_attribute<std::vector<int64_t>>("multipliers"),
        node.get_attribute<std::vector<int64_t>>("primes"),
        node.get_attribute<int64_t>("pad_id"), node.get_attribute<int64_t>("n_heads"), 1);
}

// engram.HashGatherFP8(input_ids, token_mask, compress_lut, table u8 [R,d], scales u8 [R,d/32])
// -> EngramHash(blocking=1) rows [B,T,C] -> standard ops: Gather the E4M3 bytes and E8M0 scale bytes,
// decode both through 256-entry tables, scale each block of 32 -> f32 [B, T, C*d]. The table stays the
// data input of a plain Gather.
ov::OutputVector convert_hash_gather_fp8(const ov::frontend::NodeContext& node) {
    for (int i : {3, 4}) {
        const auto type = node.get_input(i).get_element_type();
        OPENVINO_ASSERT(type == ov::element::u8 || type.is_dynamic(),
                        "engram.HashGatherFP8: table and scales must be uint8 (the stored bytes), got ", type);
    }
    auto rows = blocked_rows(node);
    auto axis = ov::op::v0::Constant::create(ov::element::i32, ov::Shape{}, {0});
    auto codes = std::make_shared<ov::op::v8::Gather>(node.get_input(3), rows, axis);        // [B,T,C,d]
    auto scale_codes = std::make_shared<ov::op::v8::Gather>(node.get_input(4), rows, axis);  // [B,T,C,d/32]
    auto blocks_shape = ov::op::v0::Constant::create(ov::element::i64, ov::Shape{5}, {0, 0, 0, -1, 32});
    auto values = decode_bytes(codes, e4m3_values());
    auto blocks = std::make_shared<ov::op::v1::Reshape>(values, blocks_shape, true);  // [B,T,C,d/32,32]
    auto last = ov::op::v0::Constant::create(ov::element::i64, ov::Shape{1}, {-1});
    auto scales = std::make_shared<ov::op::v0::Unsqueeze>(decode_bytes(scale_codes, e8m0_values()), last);
    auto scaled = std::make_shared<ov::op::v1::Multiply>(blocks, scales);
    auto flat = ov::op::v0::Constant::create(ov::element::i64, ov::Shape{3}, {0, 0, -1});
    return {std::make_shared<ov::op::v1::Reshape>(scaled, flat, true)};
}

// engram.HashGatherBlocked(input_ids, token_mask, compress_lut, table bf16/f32 [R,d]) -> EngramHash(blocking=1)
// rows [B,T,C] -> Gather(Convert(table, f32), rows) [B,T,C,d] -> [B,T,C*d]. Convert BEFORE the Gather: the
// CPU plugin takes Constant(bf16) -> Convert -> Gather as a compressed table and gathers the bf16 rows in
// place. With Gather -> Convert it turns a bf16 constant into an f32 copy on CPUs without native bf16
// (measured: a 512 MB table became +1 GB of resident memory on AVX2). For an f32 table the Convert is a
// no-op, removed by the plugin.
ov::OutputVector convert_hash_gather_blocked(const ov::frontend::NodeContext& node) {
    const auto table = node.get_input(3);
    const auto type = table.get_element_type();
    OPENVINO_ASSERT(type == ov::element::bf16 || type == ov::element::f32 || type.is_dynamic(),
                    "engram.HashGatherBlocked: the table must be bf16 or f32, got ", type);
    OPENVINO_ASSERT(table.get_partial_shape().rank().compatible(2),
                    "engram.HashGatherBlocked: the table must be [rows, head_dim], got ", table.get_partial_shape());
    auto axis = ov::op::v0::Constant::create(ov::element::i32, ov::Shape{}, {0});
    auto widened = std::make_shared<ov::op::v0::Convert>(table, ov::element::f32);
    auto values = std::make_shared<ov::op::v8::Gather>(widened, blocked_rows(node), axis);  // [B,T,C,d]
    auto flat = ov::op::v0::Constant::create(ov::element::i64, ov::Shape{3}, {0, 0, -1});
    return {std::make_shared<ov::op::v1::Reshape>(values, flat, true)};
}

ov::OutputVector convert_gated_short_conv(const ov::frontend::NodeContext& node) {
    const auto dilations = node.get_attribute<std::vector<int64_t>>("dilations");
    return {std::make_shared<EngramGatedShortConv>(
        ov::OutputVector{node.get_input(0), node.get_input(1), node.get_input(2), node.get_input(3)},
        node.get_attribute<float>("eps_key"), node.get_attribute<float>("eps_query"),
        node.get_attribute<float>("eps_conv"), node.get_attribute<float>("score_scale"),
        node.get_attribute<float>("floor"), dilations.at(0))};
}

}  // namespace engram

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({
    std::make_shared<ov::OpExtension<engram::EngramHash>>(),
    std::make_shared<ov::OpExtension<engram::EngramGatedShortConv>>(),
    std::make_shared<ov::OpExtension<engram::EngramGatherRows>>(),
    std::make_shared<ov::frontend::onnx::ConversionExtension>("GatedShortConv", "engram",
                                                              engram::convert_gated_short_conv),
    std::make_shared<ov::frontend::onnx::ConversionExtension>("HashGather", "engram",
                                                              engram::convert_hash_gather),
    std::make_shared<ov::frontend::onnx::ConversionExtension>("HashGatherFP8", "engram",
                                                              engram::convert_hash_gather_fp8),
    std::make_shared<ov::frontend::onnx::ConversionExtension>("HashGatherBlocked", "engram",
                                                              engram::convert_hash_gather_blocked),
}));

