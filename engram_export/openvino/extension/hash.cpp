// EngramHash: see hash.hpp.

#include "hash.hpp"

#include <climits>

namespace engram {

namespace {

static int64_t read_int(const ov::Tensor& tensor, size_t i) {
    switch (tensor.get_element_type()) {
    case ov::element::i64: return tensor.data<const int64_t>()[i];
    case ov::element::i32: return tensor.data<const int32_t>()[i];
    default: OPENVINO_THROW("EngramHash: integer tensor expected, got ", tensor.get_element_type());
    }
}

// count booleans (one byte each, boolean or u8) from element `first` on, as 0/1
static void read_mask(const ov::Tensor& tensor, size_t first, size_t count, uint8_t* out) {
    const auto* data = static_cast<const uint8_t*>(tensor.data()) + first;
    for (size_t i = 0; i < count; ++i) out[i] = data[i] != 0;
}

}  // namespace

void EngramHash::validate_and_infer_types() {
    NODE_VALIDATION_CHECK(this, m_blocking == 0 || m_blocking == 1, "blocking must be 0 or 1, got ",
                          m_blocking);
    NODE_VALIDATION_CHECK(this, m_multipliers.size() >= 2, "need at least two multipliers");
    NODE_VALIDATION_CHECK(this,
                          m_n_head_per_ngram > 0 &&
                              m_primes.size() == (m_multipliers.size() - 1) * m_n_head_per_ngram,
                          "primes must hold n_head_per_ngram entries per n-gram order");
    for (auto p : m_primes) NODE_VALIDATION_CHECK(this, p > 0, "primes must be positive, got ", p);
    const size_t inputs = get_input_size();
    if (m_blocking)
        NODE_VALIDATION_CHECK(this, inputs == 3 || inputs == 5,
                              "inputs (blocking=1): input_ids, compress_lut, token_mask and optionally "
                              "history_ids, history_mask; got ", inputs);
    else
        NODE_VALIDATION_CHECK(this, inputs == 2 || inputs == 3,
                              "inputs: input_ids, compress_lut and optionally the ids before them; got ",
                              inputs);

    const auto& ids = get_input_partial_shape(0);
    NODE_VALIDATION_CHECK(this, ids.rank().compatible(2), "input_ids must be [B, T], got ", ids);
    const ov::PartialShape sequence = ids.rank().is_static()
                                          ? ids
                                          : ov::PartialShape::dynamic(2);
    check_input(0, "input_ids", false, sequence);
    check_input(1, "compress_lut", false, ov::PartialShape::dynamic(1));
    const ov::PartialShape history{sequence[0], static_cast<int64_t>(m_multipliers.size() - 1)};
    if (m_blocking) {
        check_input(2, "token_mask", true, sequence);
        if (inputs == 5) {
            check_input(3, "history_ids", false, history);
            check_input(4, "history_mask", true, history);
        }
    } else if (inputs == 3) {
        check_input(2, "history_ids", false, history);
    }

    int64_t rows = 0;
    for (auto p : m_primes) rows += p;
    const auto row_type = rows <= INT32_MAX ? ov::element::i32 : ov::element::i64;
    set_output_type(0, row_type, {sequence[0], sequence[1], static_cast<int64_t>(m_primes.size())});
}

std::shared_ptr<ov::Node> EngramHash::clone_with_new_inputs(const ov::OutputVector& args) const {
    return std::make_shared<EngramHash>(args, m_multipliers, m_primes, m_pad_id, m_n_head_per_ngram,
                                        m_blocking);
}

bool EngramHash::visit_attributes(ov::AttributeVisitor& visitor) {
    visitor.on_attribute("multipliers", m_multipliers);
    visitor.on_attribute("primes", m_primes);
    visitor.on_attribute("pad_id", m_pad_id);
    visitor.on_attribute("n_head_per_ngram", m_n_head_per_ngram);
    // IRs written before `blocking` existed lack it: the IR reader then leaves the default, 0.
    visitor.on_attribute("blocking", m_blocking);
    return true;
}

bool EngramHash::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
    const auto& ids = inputs[0];
    const auto& lut = inputs[1];
    const size_t batch = ids.get_shape()[0], length = ids.get_shape()[1];
    const size_t heads = m_primes.size(), order_count = m_multipliers.size();
    const int64_t vocab = static_cast<int64_t>(lut.get_size());
    const ov::Tensor* mask = m_blocking ? &inputs[2] : nullptr;
    const ov::Tensor* history_ids = nullptr;
    const ov::Tensor* history_mask = nullptr;
    if (inputs.size() == (m_blocking ? 5u : 3u)) {
        history_ids = &inputs[m_blocking ? 3 : 2];
        history_mask = m_blocking ? &inputs[4] : nullptr;
    }

    // Per batch row, the N-1 positions before the sequence then the sequence: compressed ids
    // (negatives pass through unchanged, as in the reference) and whether each position may take
    // part in an n-gram. Without a mask every position may (the demo's hash); before the sequence,
    // pads, valid without blocking, blocked with it, unless the history says otherwise.
    const size_t before = order_count - 1, span = before + length;
    auto compress = [&](int64_t id) {
        OPENVINO_ASSERT(id < vocab, "EngramHash: input id ", id, " is out of range [0, ", vocab, ")");
        return id >= 0 ? read_int(lut, static_cast<size_t>(id)) : id;
    };
    std::vector<int64_t> x(batch * span, m_pad_id);
    std::vector<uint8_t> valid(batch * span, m_blocking ? 0 : 1);
    for (size_t b = 0; b < batch; ++b) {
        int64_t* row_ids = x.data() + b * span;
        uint8_t* row_valid = valid.data() + b * span;
        if (history_ids)
            for (size_t i = 0; i < before; ++i)
                row_ids[i] = compress(read_int(*history_ids, b * before + i));
        if (history_mask) read_mask(*history_mask, b * before, before, row_valid);
        for (size_t t = 0; t < length; ++t) row_ids[before + t] = compress(read_int(ids, b * length + t));
        if (mask) read_mask(*mask, b * length, length, row_valid + before);
    }
    std::vector<int64_t> offsets(heads, 0);
    for (size_t h = 1; h < heads; ++h) offsets[h] = offsets[h - 1] + m_primes[h - 1];

    outputs[0].set_shape({batch, length, heads});
    const bool wide = outputs[0].get_element_type() == ov::element::i64;
    auto* out32 = wide ? nullptr : outputs[0].data<int32_t>();
    auto* out64 = wide ? outputs[0].data<int64_t>() : nullptr;
    for (size_t b = 0; b < batch; ++b) {
        for (size_t t = 0; t < length; ++t) {
            const size_t here = b * span + before + t;
            // Looking back k = 0..N-1: once a position is invalid, it and all before it are the pad.
            bool blocked = false;
            auto token = [&](size_t k) {
                blocked = blocked || !valid[here - k];
                return static_cast<uint64_t>(blocked ? m_pad_id : x[here - k]);
            };
            // Unsigned products wrap modulo 2^64, exactly like numpy's int64 arithmetic.
            uint64_t mix = token(0) * static_cast<uint64_t>(m_multipliers[0]);
            size_t head = 0;
            for (size_t k = 1; k < order_count; ++k) {
                mix ^= token(k) * static_cast<uint64_t>(m_multipliers[k]);
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

void EngramHash::check_input(size_t i, const char* name, bool mask, const ov::PartialShape& expected) {
    const auto type = get_input_element_type(i);
    const bool type_ok = type.is_dynamic() ||
                         (mask ? type == ov::element::boolean || type == ov::element::u8
                               : type == ov::element::i64 || type == ov::element::i32);
    NODE_VALIDATION_CHECK(this, type_ok, name, " must be ", mask ? "boolean" : "i64 or i32", ", got ",
                          type);
    const auto& shape = get_input_partial_shape(i);
    NODE_VALIDATION_CHECK(this, shape.compatible(expected), name, " must be ", expected, ", got ", shape);
}

}  // namespace engram
