// OpenVINO extension for Engram: the n-gram hash as one custom op, bit-exact on CPU.
//
// OpenVINO's CPU plugin executes i64 arithmetic in i32, so the hash (64-bit multiply, xor, floor mod)
// cannot be written with standard ops there. EngramHash computes raw ids -> table rows in true 64-bit
// arithmetic (wrapping like numpy); the ONNX converter below turns engram.HashGather into
// EngramHash + a standard Gather on the table, so NNCF can still compress the table.

#include <cstdint>
#include <memory>
#include <vector>

#include "openvino/core/extension.hpp"
#include "openvino/core/op_extension.hpp"
#include "openvino/frontend/onnx/extension/conversion.hpp"
#include "openvino/op/constant.hpp"
#include "openvino/op/gather.hpp"
#include "openvino/op/op.hpp"
#include "openvino/op/reshape.hpp"

namespace engram {

class EngramHash : public ov::op::Op {
public:
    OPENVINO_OP("EngramHash", "engram_extension");

    EngramHash() = default;

    EngramHash(const ov::Output<ov::Node>& input_ids,
               const ov::Output<ov::Node>& compress_lut,
               std::vector<int64_t> multipliers,
               std::vector<int64_t> primes,
               int64_t pad_id,
               int64_t n_head_per_ngram)
        : Op({input_ids, compress_lut}),
          m_multipliers(std::move(multipliers)),
          m_primes(std::move(primes)),
          m_pad_id(pad_id),
          m_n_head_per_ngram(n_head_per_ngram) {
        constructor_validate_and_infer_types();
    }

    void validate_and_infer_types() override {
        const auto& ids = get_input_partial_shape(0);
        NODE_VALIDATION_CHECK(this, ids.rank().compatible(2), "input_ids must be [B, T], got ", ids);
        NODE_VALIDATION_CHECK(this, get_input_element_type(0).is_integral_number(),
                              "input_ids must be integers");
        NODE_VALIDATION_CHECK(this, m_multipliers.size() >= 2, "need at least two multipliers");
        NODE_VALIDATION_CHECK(this,
                              m_n_head_per_ngram > 0 &&
                                  m_primes.size() == (m_multipliers.size() - 1) * m_n_head_per_ngram,
                              "primes must hold n_head_per_ngram entries per n-gram order");
        int64_t rows = 0;
        for (auto p : m_primes) rows += p;
        const auto row_type = rows <= INT32_MAX ? ov::element::i32 : ov::element::i64;
        ov::PartialShape out{ov::Dimension::dynamic(), ov::Dimension::dynamic(),
                             static_cast<int64_t>(m_primes.size())};
        if (ids.rank().is_static()) {
            out[0] = ids[0];
            out[1] = ids[1];
        }
        set_output_type(0, row_type, out);
    }

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<EngramHash>(args.at(0), args.at(1), m_multipliers, m_primes, m_pad_id,
                                            m_n_head_per_ngram);
    }

    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("multipliers", m_multipliers);
        visitor.on_attribute("primes", m_primes);
        visitor.on_attribute("pad_id", m_pad_id);
        visitor.on_attribute("n_head_per_ngram", m_n_head_per_ngram);
        return true;
    }

    bool has_evaluate() const override { return true; }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
        const auto& ids = inputs[0];
        const auto& lut = inputs[1];
        const size_t batch = ids.get_shape()[0], length = ids.get_shape()[1];
        const size_t heads = m_primes.size(), order_count = m_multipliers.size();
        const int64_t vocab = static_cast<int64_t>(lut.get_size());

        // Compressed ids, negatives passing through unchanged (as in the reference).
        std::vector<int64_t> x(batch * length);
        for (size_t i = 0; i < x.size(); ++i) {
            const int64_t id = read_int(ids, i);
            OPENVINO_ASSERT(id < vocab, "EngramHash: input id ", id, " is out of range [0, ", vocab, ")");
            x[i] = id >= 0 ? read_int(lut, static_cast<size_t>(id)) : id;
        }
        std::vector<int64_t> offsets(heads, 0);
        for (size_t h = 1; h < heads; ++h) offsets[h] = offsets[h - 1] + m_primes[h - 1];

        outputs[0].set_shape({batch, length, heads});
        const bool wide = outputs[0].get_element_type() == ov::element::i64;
        auto* out32 = wide ? nullptr : outputs[0].data<int32_t>();
        auto* out64 = wide ? outputs[0].data<int64_t>() : nullptr;
        for (size_t b = 0; b < batch; ++b) {
            for (size_t t = 0; t < length; ++t) {
                // Unsigned products wrap modulo 2^64, exactly like numpy's int64 arithmetic.
                uint64_t mix = static_cast<uint64_t>(x[b * length + t]) * static_cast<uint64_t>(m_multipliers[0]);
                size_t head = 0;
                for (size_t k = 1; k < order_count; ++k) {
                    const int64_t token = t >= k ? x[b * length + t - k] : m_pad_id;
                    mix ^= static_cast<uint64_t>(token) * static_cast<uint64_t>(m_multipliers[k]);
                    for (int64_t j = 0; j < m_n_head_per_ngram; ++j, ++head) {
                        int64_t hash = static_cast<int64_t>(mix) % m_primes[head];
                        if (hash < 0) hash += m_primes[head];  // floor mod, as numpy's %
                        const int64_t row = hash + offsets[head];
                        const size_t at = (b * length + t) * heads + head;
                        if (wide) out64[at] = row; else out32[at] = static_cast<int32_t>(row);
                    }
                }
            }
        }
        return true;
    }

private:
    static int64_t read_int(const ov::Tensor& tensor, size_t i) {
        switch (tensor.get_element_type()) {
        case ov::element::i64: return tensor.data<const int64_t>()[i];
        case ov::element::i32: return tensor.data<const int32_t>()[i];
        default: OPENVINO_THROW("EngramHash: integer tensor expected, got ", tensor.get_element_type());
        }
    }

    std::vector<int64_t> m_multipliers;
    std::vector<int64_t> m_primes;
    int64_t m_pad_id = 0;
    int64_t m_n_head_per_ngram = 1;
};

// engram.HashGather(input_ids, compress_lut, table) -> EngramHash rows -> Gather(table) -> [B, T, H*d]
ov::OutputVector convert_hash_gather(const ov::frontend::NodeContext& node) {
    auto rows = std::make_shared<EngramHash>(node.get_input(0), node.get_input(1),
                                             node.get_attribute<std::vector<int64_t>>("multipliers"),
                                             node.get_attribute<std::vector<int64_t>>("primes"),
                                             node.get_attribute<int64_t>("pad_id"),
                                             node.get_attribute<int64_t>("n_head_per_ngram"));
    auto axis = ov::op::v0::Constant::create(ov::element::i32, ov::Shape{}, {0});
    auto gathered = std::make_shared<ov::op::v8::Gather>(node.get_input(2), rows, axis);
    auto flat = ov::op::v0::Constant::create(ov::element::i64, ov::Shape{3}, {0, 0, -1});
    return {std::make_shared<ov::op::v1::Reshape>(gathered, flat, true)};
}

}  // namespace engram

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({
    std::make_shared<ov::OpExtension<engram::EngramHash>>(),
    std::make_shared<ov::frontend::onnx::ConversionExtension>("HashGather", "engram",
                                                              engram::convert_hash_gather),
}));
