// EngramHash: the n-gram hash, bit-exact. OpenVINO's CPU plugin executes i64 arithmetic in i32, so the
// hash (64-bit multiply, xor, floor mod) cannot be written with standard ops there. It computes raw
// ids -> table rows in true 64-bit arithmetic (wrapping like numpy); the ONNX converter turns
// engram.HashGather into EngramHash + a standard Gather on the table, so NNCF can still compress it.
// With blocking=1 it is DeepSeek-V4.1's hash (image tokens block n-grams).

#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "openvino/op/op.hpp"

namespace engram {

class EngramHash : public ov::op::Op {
public:
    OPENVINO_OP("EngramHash", "engram_extension");

    EngramHash() = default;

    // blocking = 0: (input_ids [B,T], compress_lut [V], [history_ids [B,N-1]]): the demo's hash; the
    //   optional history (decode state: raw ids, or the raw pad id at the start of a sequence) takes
    //   the place of the pads before the sequence.
    // blocking = 1: (input_ids [B,T], compress_lut [V], token_mask [B,T] boolean, [history_ids [B,N-1],
    //   history_mask [B,N-1] boolean]): DeepSeek-V4.1's hash. Looking back from t, a token is the pad
    //   once any position from t back to it is masked (an image token) or before the sequence (without
    //   history; with it, the history's mask decides). blocking = 0 is blocking = 1 with an all-true mask.
    EngramHash(const ov::OutputVector& args,
               std::vector<int64_t> multipliers,
               std::vector<int64_t> primes,
               int64_t pad_id,
               int64_t n_head_per_ngram,
               int64_t blocking = 0)
        : Op(args),
          m_multipliers(std::move(multipliers)),
          m_primes(std::move(primes)),
          m_pad_id(pad_id),
          m_n_head_per_ngram(n_head_per_ngram),
          m_blocking(blocking) {
        constructor_validate_and_infer_types();
    }

    void validate_and_infer_types() override;

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override;

    bool visit_attributes(ov::AttributeVisitor& visitor) override;

    bool has_evaluate() const override { return true; }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;

private:
    // Element type and shape compatibility of one input. Ids: i64 or i32; masks: boolean, or u8 (the
    // CPU plugin's precision pass turns boolean into u8 before compiling; nonzero is true).
    void check_input(size_t i, const char* name, bool mask, const ov::PartialShape& expected);

    std::vector<int64_t> m_multipliers;
    std::vector<int64_t> m_primes;
    int64_t m_pad_id = 0;
    int64_t m_n_head_per_ngram = 1;
    int64_t m_blocking = 0;
};

}  // namespace engram
