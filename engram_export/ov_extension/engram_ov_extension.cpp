// OpenVINO extension for Engram: two custom ops for the CPU plugin.
//
// EngramHash: the n-gram hash, bit-exact. OpenVINO's CPU plugin executes i64 arithmetic in i32, so the
// hash (64-bit multiply, xor, floor mod) cannot be written with standard ops there. It computes raw
// ids -> table rows in true 64-bit arithmetic (wrapping like numpy); the ONNX converter turns
// engram.HashGather into EngramHash + a standard Gather on the table, so NNCF can still compress it.
// With blocking=1 it is DeepSeek-V4.1's hash (image tokens block n-grams); engram.HashGatherFP8 becomes
// EngramHash(blocking=1) + standard Gathers and FP8/E8M0 decoding of the table's rows, and
// engram.HashGatherBlocked (a BF16 or F32 table) EngramHash(blocking=1) + Gather + Convert to f32.
//
// EngramGatedShortConv: everything after the projection GEMM (gates, gated value, short-conv norm,
// causal depthwise conv, SiLU, residual) in one pass over memory. With standard ops each of those steps
// reads and writes a [B,T,G,D] tensor, which on CPU costs as much as the GEMM itself.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "gather_rows.hpp"
#include "openvino/core/extension.hpp"
#include "openvino/core/parallel.hpp"
#include "openvino/core/op_extension.hpp"
#include "openvino/frontend/onnx/extension/conversion.hpp"
#include "openvino/op/constant.hpp"
#include "openvino/op/convert.hpp"
#include "openvino/op/gather.hpp"
#include "openvino/op/multiply.hpp"
#include "openvino/op/op.hpp"
#include "openvino/op/reshape.hpp"
#include "openvino/op/unsqueeze.hpp"

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

    void validate_and_infer_types() override {
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

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<EngramHash>(args, m_multipliers, m_primes, m_pad_id, m_n_head_per_ngram,
                                            m_blocking);
    }

    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("multipliers", m_multipliers);
        visitor.on_attribute("primes", m_primes);
        visitor.on_attribute("pad_id", m_pad_id);
        visitor.on_attribute("n_head_per_ngram", m_n_head_per_ngram);
        // IRs written before `blocking` existed lack it: the IR reader then leaves the default, 0.
        visitor.on_attribute("blocking", m_blocking);
        return true;
    }

    bool has_evaluate() const override { return true; }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
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

private:
    // Element type and shape compatibility of one input. Ids: i64 or i32; masks: boolean, or u8 (the
    // CPU plugin's precision pass turns boolean into u8 before compiling; nonzero is true).
    void check_input(size_t i, const char* name, bool mask, const ov::PartialShape& expected) {
        const auto type = get_input_element_type(i);
        const bool type_ok = type.is_dynamic() ||
                             (mask ? type == ov::element::boolean || type == ov::element::u8
                                   : type == ov::element::i64 || type == ov::element::i32);
        NODE_VALIDATION_CHECK(this, type_ok, name, " must be ", mask ? "boolean" : "i64 or i32", ", got ",
                              type);
        const auto& shape = get_input_partial_shape(i);
        NODE_VALIDATION_CHECK(this, shape.compatible(expected), name, " must be ", expected, ", got ", shape);
    }

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

    std::vector<int64_t> m_multipliers;
    std::vector<int64_t> m_primes;
    int64_t m_pad_id = 0;
    int64_t m_n_head_per_ngram = 1;
    int64_t m_blocking = 0;
};

// exp(x) for the SiLU, branch-free so that `omp simd` loops vectorize it: Cody-Waite range reduction
// and a degree-6 polynomial, within 2 ulp of expf over the range that matters (|x| < 88).
static inline float fast_exp(float x) {
    x = std::min(std::max(x, -87.0f), 88.0f);
    const float n = std::nearbyint(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits;
    std::memcpy(&bits, &p, sizeof bits);
    bits += static_cast<int32_t>(n) << 23;
    std::memcpy(&p, &bits, sizeof p);
    return p;
}

// Inputs: proj [B,T,(G+1)*D] (G keys, then the value), hidden [B,T,G,D], scales [G,D] (norm1 * norm2
// weights), conv_weight [G*D,1,K,1] (short-conv norm weights folded in). Output [B,T,G,D] f32.
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

    void validate_and_infer_types() override {
        const auto& hidden = get_input_partial_shape(1);
        NODE_VALIDATION_CHECK(this, hidden.rank().compatible(4), "hidden must be [B, T, G, D]");
        NODE_VALIDATION_CHECK(this, get_input_size() == 4 || get_input_size() == 5, "4 or 5 inputs");
        for (size_t i = 0; i < get_input_size(); ++i)
            NODE_VALIDATION_CHECK(this, get_input_element_type(i).is_real(), "inputs must be float");
        set_output_type(0, ov::element::f32, hidden);
        if (get_input_size() == 5) set_output_type(1, ov::element::f32, get_input_partial_shape(4));
    }

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<EngramGatedShortConv>(args, m_eps_key, m_eps_query, m_eps_conv,
                                                      m_score_scale, m_floor, m_dilation);
    }

    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("eps_key", m_eps_key);
        visitor.on_attribute("eps_query", m_eps_query);
        visitor.on_attribute("eps_conv", m_eps_conv);
        visitor.on_attribute("score_scale", m_score_scale);
        visitor.on_attribute("floor", m_floor);
        visitor.on_attribute("dilation", m_dilation);
        return true;
    }

    bool has_evaluate() const override { return true; }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
        const auto& shape = inputs[1].get_shape();
        const size_t batch = shape[0], length = shape[1], groups = shape[2], dim = shape[3];
        const size_t width = inputs[0].get_shape()[2];
        OPENVINO_ASSERT(width == (groups + 1) * dim, "EngramGatedShortConv: proj must be [B, T, (G+1)*D]");
        const auto proj = as_f32(inputs[0]), hidden = as_f32(inputs[1]), scales = as_f32(inputs[2]),
                   conv = as_f32(inputs[3]);
        const size_t kernel = inputs[3].get_size() / (groups * dim);
        // conv taps as [K][G*D], so the inner loops run over contiguous channels
        std::vector<float> taps(kernel * groups * dim);
        for (size_t c = 0; c < groups * dim; ++c)
            for (size_t j = 0; j < kernel; ++j) taps[j * groups * dim + c] = conv[c * kernel + j];
        outputs[0].set_shape(shape);
        float* out = outputs[0].data<float>();
        const size_t reach = (kernel - 1) * static_cast<size_t>(m_dilation);
        const bool stateful = inputs.size() == 5;
        F32View history{nullptr, nullptr};
        float* next_history = nullptr;
        if (stateful) {
            OPENVINO_ASSERT(inputs[4].get_shape() == ov::Shape({batch, reach, groups * dim}),
                            "EngramGatedShortConv: conv history must be [B, ", reach, ", ", groups * dim, "]");
            history = as_f32(inputs[4]);
            outputs[1].set_shape(inputs[4].get_shape());
            next_history = outputs[1].data<float>();
        }
        const Params p{length, groups, dim, width, kernel, static_cast<size_t>(m_dilation), reach, m_eps_key,
                       m_eps_query, m_eps_conv, m_score_scale, m_floor};
        ov::parallel_for(batch * groups, [&](size_t item) {
            const size_t b = item / groups, g = item % groups;
            const size_t state = b * reach * groups * dim;
            gated_conv_row(p, g, proj + b * length * width, hidden + b * length * groups * dim,
                           scales + g * dim, taps.data(), out + b * length * groups * dim,
                           stateful ? history + state : nullptr, stateful ? next_history + state : nullptr);
        });
        return true;
    }

private:
    struct Params {
        size_t length, groups, dim, width, kernel, dilation, reach;
        float eps_key, eps_query, eps_conv, score_scale, floor;
    };

    // One (batch row, branch): all T positions of that branch.
    __attribute__((target_clones("avx512f", "avx2", "default")))
    static void gated_conv_row(const Params& p, size_t g, const float* proj, const float* hidden,
                               const float* scales, const float* taps, float* out, const float* history,
                               float* next_history) {
        const size_t dim = p.dim, stride = p.groups * dim;
        // per-thread scratch, grown once: this branch's normed gated values [T, D], the conv sum [D],
        // the gates [T] (no allocation and no zero fill per row)
        thread_local std::vector<float> scratch;
        scratch.resize((p.length + 1) * dim + p.length);
        float* normed = scratch.data();
        float* acc = normed + p.length * dim;
        float* gates = acc + dim;
        // the conv input at position q of [the `reach` positions before the sequence, the sequence]:
        // the decode history there, or nullptr for the zeros before a sequence's start
        auto input_at = [&](size_t q) -> const float* {
            if (q >= p.reach) return normed + (q - p.reach) * dim;
            return history ? history + q * stride + g * dim : nullptr;
        };
        for (size_t t = 0; t < p.length; ++t) {
            const float* key = proj + t * p.width + g * dim;
            const float* value = proj + t * p.width + p.groups * dim;
            const float* query = hidden + t * stride + g * dim;
            float kk = 0, qq = 0, kq = 0, vv = 0;
#pragma omp simd reduction(+ : kk, qq, kq, vv)
            for (size_t d = 0; d < dim; ++d) {
                kk += key[d] * key[d];
                qq += query[d] * query[d];
                kq += key[d] * query[d] * scales[d];
                vv += value[d] * value[d];
            }
            const float n = static_cast<float>(dim);
            const float score = kq / (std::sqrt(kk / n + p.eps_key) * std::sqrt(qq / n + p.eps_query)) /
                                p.score_scale;
            const float sign = static_cast<float>((score > 0) - (score < 0));
            const float gate = 1.0f / (1.0f + std::exp(-sign * std::sqrt(std::max(std::fabs(score), p.floor))));
            gates[t] = gate;
            // RMSNorm of the gated value: rms(gate * v) = |gate| * rms(v)
            const float inv = gate / std::sqrt(gate * gate * vv / n + p.eps_conv);
            float* row = normed + t * dim;
#pragma omp simd
            for (size_t d = 0; d < dim; ++d) row[d] = value[d] * inv;
        }
        for (size_t t = 0; t < p.length; ++t) {
            std::fill(acc, acc + dim, 0.0f);
            for (size_t j = 0; j < p.kernel; ++j) {
                const size_t back = (p.kernel - 1 - j) * p.dilation;  // <= reach: causal
                const float* x = input_at(p.reach + t - back);
                if (x == nullptr) continue;  // zeros before the sequence
                const float* tap = taps + j * stride + g * dim;
#pragma omp simd
                for (size_t d = 0; d < dim; ++d) acc[d] += tap[d] * x[d];
            }
            const float* value = proj + t * p.width + p.groups * dim;
            float* row = out + t * stride + g * dim;
            const float gate = gates[t];
#pragma omp simd
            for (size_t d = 0; d < dim; ++d) row[d] = gate * value[d] + acc[d] / (1.0f + fast_exp(-acc[d]));
        }
        if (next_history)
            for (size_t r = 0; r < p.reach; ++r) {
                const float* x = input_at(p.length + r);
                float* dst = next_history + r * stride + g * dim;
                if (x) std::copy_n(x, dim, dst);
                else std::fill(dst, dst + dim, 0.0f);
            }
    }

    // The tensor's data as f32, converted into a buffer kept alive by the returned handle if needed.
    struct F32View {
        std::shared_ptr<std::vector<float>> owned;
        const float* data;
        operator const float*() const { return data; }
    };
    static F32View as_f32(const ov::Tensor& tensor) {
        if (tensor.get_element_type() == ov::element::f32) return {nullptr, tensor.data<const float>()};
        auto buffer = std::make_shared<std::vector<float>>(tensor.get_size());
        ov::Tensor converted(ov::element::f32, tensor.get_shape(), buffer->data());
        OPENVINO_ASSERT(convert_to_f32(tensor, converted), "EngramGatedShortConv: unsupported input type ",
                        tensor.get_element_type());
        return {buffer, buffer->data()};
    }
    static bool convert_to_f32(const ov::Tensor& from, ov::Tensor& to) {
        float* dst = to.data<float>();
        const size_t n = from.get_size();
        switch (from.get_element_type()) {
        case ov::element::bf16: {
            const auto* src = from.data<const ov::bfloat16>();
            for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
            return true;
        }
        case ov::element::f16: {
            const auto* src = from.data<const ov::float16>();
            for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
            return true;
        }
        default:
            return false;
        }
    }

    float m_eps_key = 0, m_eps_query = 0, m_eps_conv = 0, m_score_scale = 1, m_floor = 0;
    int64_t m_dilation = 1;
};

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

// engram.HashGatherFP8(input_ids, token_mask, compress_lut, table u8 [R,d], scales u8 [R,d/32])
// -> EngramHash(blocking=1) rows [B,T,C] -> standard ops: Gather the E4M3 bytes and E8M0 scale bytes,
// decode both through 256-entry tables, scale each block of 32 -> f32 [B, T, C*d]. The table stays the
// data input of a plain Gather.
// The V4.1 rows [B,T,C] of a HashGatherFP8 / HashGatherBlocked node (input_ids, token_mask, compress_lut, ..)
static std::shared_ptr<EngramHash> blocked_rows(const ov::frontend::NodeContext& node) {
    return std::make_shared<EngramHash>(
        ov::OutputVector{node.get_input(0), node.get_input(2), node.get_input(1)},
        node.get_attribute<std::vector<int64_t>>("multipliers"),
        node.get_attribute<std::vector<int64_t>>("primes"),
        node.get_attribute<int64_t>("pad_id"), node.get_attribute<int64_t>("n_heads"), 1);
}

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
