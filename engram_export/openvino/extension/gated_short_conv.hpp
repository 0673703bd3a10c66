// EngramGatedShortConv: everything after the projection GEMM (gates, gated value, short-conv norm,
// causal depthwise conv, SiLU, residual) in one pass over memory. With standard ops each of those steps
// reads and writes a [B,T,G,D] tensor, which on CPU costs as much as the GEMM itself.

#pragma once

#include <cstdint>
#include <memory>

#include "openvino/op/op.hpp"

namespace engram {

// Inputs: proj [B,T,(G+1)*D] (G keys, then the value; f32 or bf16), hidden [B,T,G,D], scales [G,D]
// (norm1 * norm2 weights), conv_weight [G*D,1,K,1] (short-conv norm weights folded in). Output [B,T,G,D]
// f32.
// Decode state: a 5th input [B,R,G*D], the conv inputs (normed gated values) of the R = (K-1)*dilation
// positions before the sequence (zeros at its start), makes a 2nd output: the same for after it.
class EngramGatedShortConv : public ov::op::Op {
public:
    OPENVINO_OP("EngramGatedShortConv", "engram_extension");

    EngramGatedShortConv() = default;

    EngramGatedShortConv(const ov::OutputVector& args, float eps_key, float eps_query, float eps_conv,
                         float score_scale, float floor, int64_t dilation)
        : Op(args),
          m_eps_key(eps_key),
          m_eps_query(eps_query),
          m_eps_conv(eps_conv),
          m_score_scale(score_scale),
          m_floor(floor),
          m_dilation(dilation) {
        constructor_validate_and_infer_types();
    }

    void validate_and_infer_types() override;

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override;

    bool visit_attributes(ov::AttributeVisitor& visitor) override;

    bool has_evaluate() const override { return true; }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;

private:
    float m_eps_key = 0, m_eps_query = 0, m_eps_conv = 0, m_score_scale = 1, m_floor = 0;
    int64_t m_dilation = 1;
};

}  // namespace engram
