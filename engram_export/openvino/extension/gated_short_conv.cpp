// EngramGatedShortConv: see gated_short_conv.hpp.

#include "gated_short_conv.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "compiler.hpp"
#include "openvino/core/parallel.hpp"

namespace engram {

namespace {

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

// bf16 bits -> f32 (exact): a bf16 GEMM's output reaches the kernel without a conversion pass over it,
// each row widened into the kernel's scratch as it is read.
static inline float widen(uint16_t bf16_bits) {
    const uint32_t bits = static_cast<uint32_t>(bf16_bits) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

struct Params {
    size_t length, groups, dim, width, kernel, dilation, reach;
    float eps_key, eps_query, eps_conv, score_scale, floor;
};

template <typename Proj>
ENGRAM_ALWAYS_INLINE static void gated_conv(const Params& p, size_t g, const Proj* proj, const float* hidden,
                                            const float* scales, const float* taps, float* out,
                                            const float* history, float* next_history) {
    const size_t dim = p.dim, stride = p.groups * dim;
    // per-thread scratch, grown once: this branch's normed gated values [T, D], the conv sum [D],
    // the gates [T] (no allocation and no zero fill per row)
    thread_local std::vector<float> scratch;
    constexpr bool narrow = !std::is_same_v<Proj, float>;
    scratch.resize((p.length + 1) * dim + p.length + (narrow ? (p.length + 1) * dim : 0));
    float* normed = scratch.data();
    float* acc = normed + p.length * dim;
    float* gates = acc + dim;
    float* values = gates + p.length;  // bf16 only: the value rows widened [T, D], then a key row [D]
    float* key_row = values + p.length * dim;
    // the conv input at position q of [the `reach` positions before the sequence, the sequence]:
    // the decode history there, or nullptr for the zeros before a sequence's start
    auto input_at = [&](size_t q) -> const float* {
        if (q >= p.reach) return normed + (q - p.reach) * dim;
        return history ? history + q * stride + g * dim : nullptr;
    };
    for (size_t t = 0; t < p.length; ++t) {
        const float* key;
        const float* value;
        if constexpr (narrow) {
            const Proj* k16 = proj + t * p.width + g * dim;
            const Proj* v16 = proj + t * p.width + p.groups * dim;
            float* v32 = values + t * dim;
#pragma omp simd
            for (size_t d = 0; d < dim; ++d) {
                key_row[d] = widen(k16[d]);
                v32[d] = widen(v16[d]);
            }
            key = key_row;
            value = v32;
        } else {
            key = proj + t * p.width + g * dim;
            value = proj + t * p.width + p.groups * dim;
        }
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
        const float* value;
        if constexpr (narrow) value = values + t * dim;
        else value = proj + t * p.width + p.groups * dim;
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

// One (batch row, branch): all T positions of that branch, for each instruction set (the template
// below inlined into each clone). proj: f32, or bf16 bits.
ENGRAM_TARGET_CLONES
static void gated_conv_row(const Params& p, size_t g, const float* proj, const float* hidden,
                           const float* scales, const float* taps, float* out, const float* history,
                           float* next_history) {
    gated_conv<float>(p, g, proj, hidden, scales, taps, out, history, next_history);
}
ENGRAM_TARGET_CLONES
static void gated_conv_row(const Params& p, size_t g, const uint16_t* proj, const float* hidden,
                           const float* scales, const float* taps, float* out, const float* history,
                           float* next_history) {
    gated_conv<uint16_t>(p, g, proj, hidden, scales, taps, out, history, next_history);
}

// The tensor's data as f32, converted into a buffer kept alive by the returned handle if needed.
struct F32View {
    std::shared_ptr<std::vector<float>> owned;
    const float* data;
    operator const float*() const { return data; }
};

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

static F32View as_f32(const ov::Tensor& tensor) {
    if (tensor.get_element_type() == ov::element::f32) return {nullptr, tensor.data<const float>()};
    auto buffer = std::make_shared<std::vector<float>>(tensor.get_size());
    ov::Tensor converted(ov::element::f32, tensor.get_shape(), buffer->data());
    OPENVINO_ASSERT(convert_to_f32(tensor, converted), "EngramGatedShortConv: unsupported input type ",
                    tensor.get_element_type());
    return {buffer, buffer->data()};
}

}  // namespace

void EngramGatedShortConv::validate_and_infer_types() {
    const auto& hidden = get_input_partial_shape(1);
    NODE_VALIDATION_CHECK(this, hidden.rank().compatible(4), "hidden must be [B, T, G, D]");
    NODE_VALIDATION_CHECK(this, get_input_size() == 4 || get_input_size() == 5, "4 or 5 inputs");
    for (size_t i = 0; i < get_input_size(); ++i)
        NODE_VALIDATION_CHECK(this, get_input_element_type(i).is_real(), "inputs must be float");
    const auto& proj = get_input_partial_shape(0);
    NODE_VALIDATION_CHECK(this, proj.rank().compatible(3), "proj must be [B, T, (G+1)*D], got ", proj);
    if (hidden.rank().is_static() && proj.rank().is_static()) {
        const auto& groups = hidden[2];
        const auto& dim = hidden[3];
        NODE_VALIDATION_CHECK(this, proj[0].compatible(hidden[0]) && proj[1].compatible(hidden[1]),
                              "proj and hidden must have the same [B, T], got ", proj, " and ", hidden);
        if (groups.is_static() && dim.is_static() && proj[2].is_static())
            NODE_VALIDATION_CHECK(this, proj[2].get_length() == (groups.get_length() + 1) * dim.get_length(),
                                  "proj must be [B, T, (G+1)*D] for hidden ", hidden, ", got ", proj);
        const auto& conv = get_input_partial_shape(3);
        if (get_input_size() == 5 && conv.is_static() && groups.is_static() && dim.is_static()) {
            const int64_t channels = groups.get_length() * dim.get_length();
            const int64_t kernel = static_cast<int64_t>(ov::shape_size(conv.to_shape())) / channels;
            const ov::PartialShape history{hidden[0], (kernel - 1) * m_dilation, channels};
            NODE_VALIDATION_CHECK(this, get_input_partial_shape(4).compatible(history),
                                  "the conv history must be ", history, ", got ", get_input_partial_shape(4));
        }
    }
    set_output_type(0, ov::element::f32, hidden);
    if (get_input_size() == 5) set_output_type(1, ov::element::f32, get_input_partial_shape(4));
}

std::shared_ptr<ov::Node> EngramGatedShortConv::clone_with_new_inputs(const ov::OutputVector& args) const {
    return std::make_shared<EngramGatedShortConv>(args, m_eps_key, m_eps_query, m_eps_conv,
                                                  m_score_scale, m_floor, m_dilation);
}

bool EngramGatedShortConv::visit_attributes(ov::AttributeVisitor& visitor) {
    visitor.on_attribute("eps_key", m_eps_key);
    visitor.on_attribute("eps_query", m_eps_query);
    visitor.on_attribute("eps_conv", m_eps_conv);
    visitor.on_attribute("score_scale", m_score_scale);
    visitor.on_attribute("floor", m_floor);
    visitor.on_attribute("dilation", m_dilation);
    return true;
}

bool EngramGatedShortConv::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
    const auto& shape = inputs[1].get_shape();
    const size_t batch = shape[0], length = shape[1], groups = shape[2], dim = shape[3];
    const size_t width = inputs[0].get_shape()[2];
    OPENVINO_ASSERT(width == (groups + 1) * dim, "EngramGatedShortConv: proj must be [B, T, (G+1)*D]");
    const auto hidden = as_f32(inputs[1]), scales = as_f32(inputs[2]), conv = as_f32(inputs[3]);
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
    auto run = [&](auto proj) {
        ov::parallel_for(batch * groups, [&](size_t item) {
            const size_t b = item / groups, g = item % groups;
            const size_t state = b * reach * groups * dim;
            gated_conv_row(p, g, proj + b * length * width, hidden + b * length * groups * dim,
                           scales + g * dim, taps.data(), out + b * length * groups * dim,
                           stateful ? history + state : nullptr, stateful ? next_history + state : nullptr);
        });
    };
    if (inputs[0].get_element_type() == ov::element::bf16)
        run(static_cast<const uint16_t*>(inputs[0].data()));
    else
        run(static_cast<const float*>(as_f32(inputs[0])));
    return true;
}

}  // namespace engram
