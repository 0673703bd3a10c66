// EngramGatherRows (see gather_rows.hpp): the row-gather kernel for every stored table form.

#include "gather_rows.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "compiler.hpp"
#include "openvino/core/parallel.hpp"
#include "table_tier.hpp"

namespace engram {
namespace {

enum class Element { f32, f16, bf16, u8, u4, e4m3, unknown };
// e8m0_bits: an E8M0 byte read as vLLM's kernel reads it, the float whose exponent bits it is (byte 0
// is 0.0, byte 255 infinity; the spec's, and SGLang's, are 2^-127 and NaN); the row API's "vllm" decode
enum class Scale { none, f16, f32, e8m0, e8m0_bits, unknown };
enum class ZeroPoint { none, u8, u4, unknown };

Element element_of(const std::string& name) {
    for (auto [text, value] : {std::pair{"f32", Element::f32}, {"f16", Element::f16}, {"bf16", Element::bf16},
                               {"u8", Element::u8}, {"u4", Element::u4}, {"e4m3", Element::e4m3}})
        if (name == text) return value;
    return Element::unknown;
}

Scale scale_of(const std::string& name) {
    for (auto [text, value] : {std::pair{"none", Scale::none}, {"f16", Scale::f16}, {"f32", Scale::f32},
                               {"e8m0", Scale::e8m0}})
        if (name == text) return value;
    return Scale::unknown;
}

ZeroPoint zero_point_of(const std::string& name) {
    for (auto [text, value] : {std::pair{"none", ZeroPoint::none}, {"u8", ZeroPoint::u8}, {"u4", ZeroPoint::u4}})
        if (name == text) return value;
    return ZeroPoint::unknown;
}

size_t bits_of(Element e) {
    switch (e) {
    case Element::f32: return 32;
    case Element::f16:
    case Element::bf16: return 16;
    case Element::u4: return 4;
    default: return 8;
    }
}

size_t bytes_of(Scale s) {
    return s == Scale::f32 ? 4 : s == Scale::f16 ? 2 : (s == Scale::e8m0 || s == Scale::e8m0_bits) ? 1 : 0;
}
size_t bits_of(ZeroPoint z) { return z == ZeroPoint::u8 ? 8 : z == ZeroPoint::u4 ? 4 : 0; }

inline float from_bits(uint32_t bits) {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

inline uint32_t to_bits(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    return bits;
}

// IEEE half -> float, branch-free so that loops over a row vectorize (normals, subnormals, inf, NaN).
inline float f16_to_f32(uint16_t half) {
    const uint32_t shifted = static_cast<uint32_t>(half & 0x7fff) << 13;
    const uint32_t exponent = shifted & (0x7c00u << 13);
    const uint32_t normal = shifted + ((127 - 15) << 23);
    const uint32_t special = normal + ((128 - 16) << 23);                             // inf, NaN
    const uint32_t subnormal = to_bits(from_bits(normal + (1u << 23)) - 6.103515625e-05f);  // - 2^-14
    const uint32_t magnitude = exponent == (0x7c00u << 13) ? special : exponent == 0 ? subnormal : normal;
    return from_bits(magnitude | (static_cast<uint32_t>(half & 0x8000) << 16));
}

// FP8 E4M3 (no infinities; S.1111.111 is NaN) -> float, exactly.
inline float e4m3_to_f32(uint8_t code) {
    const uint32_t exponent = (code >> 3) & 0xF, mantissa = code & 0x7;
    const float normal = from_bits(((exponent + 120) << 23) | (mantissa << 20));
    const float subnormal = static_cast<float>(mantissa) * 0.001953125f;  // mantissa * 2^-9
    float magnitude = exponent == 0 ? subnormal : normal;
    magnitude = (code & 0x7F) == 0x7F ? from_bits(0x7FC00000u) : magnitude;
    return code & 0x80 ? -magnitude : magnitude;
}

// E8M0 (a power of two; 0xFF is NaN) -> float; 2^-127 is a float subnormal.
inline float e8m0_to_f32(uint8_t code) {
    return code == 0xFF ? from_bits(0x7FC00000u) : code == 0 ? from_bits(0x00400000u) : from_bits(uint32_t(code) << 23);
}

// float -> bf16, round to nearest even (NaN stays NaN), as OpenVINO's Convert does
inline uint16_t f32_to_bf16(float value) {
    const uint32_t bits = to_bits(value);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return (bits & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>((bits >> 16) | 0x40u)
                                              : static_cast<uint16_t>(rounded);
}

inline void put(float* out, size_t i, float value) { out[i] = value; }
inline void put(uint16_t* out, size_t i, float value) { out[i] = f32_to_bf16(value); }

struct Job {
    Element element;
    Scale scale;
    ZeroPoint zero_point;
    size_t row_size, group_size, groups, row_bytes, table_rows;
    const uint8_t* table;
    const uint8_t* scales;
    const uint8_t* zeros;
    const void* rows;  // i32 or i64
    bool wide_rows;
    const RowRef* refs;  // where each row is (a tier's, the row API's); null: every row in `table`
    void* out;  // float or bf16 bits
    bool bf16_out;
    // lookup i's output row is at out + (i / out_inner) * out_strides[0] + (i % out_inner) * out_strides[1]
    // bytes: [B,T,C] rows into a contiguous [B,T,C,d] have one outer row; the row API's may be strided
    size_t out_inner;
    size_t out_strides[2];

    uint8_t* out_row(size_t i) const {
        return static_cast<uint8_t*>(out) + (i / out_inner) * out_strides[0] + (i % out_inner) * out_strides[1];
    }
    size_t row(size_t i) const {
        return wide_rows ? static_cast<size_t>(static_cast<const int64_t*>(rows)[i])
                         : static_cast<size_t>(static_cast<const int32_t*>(rows)[i]);
    }
    // Where lookup i's stored bytes are: resolved by a tier, or row(i) of the table inputs. A template
    // argument, not a branch: the untiered loop stays as tight as it was (measured: a branch here made
    // the FP8 lookup 1.4x slower).
    template <bool Tiered>
    ENGRAM_ALWAYS_INLINE RowRef ref(size_t i) const {
        if constexpr (Tiered) {
            return refs[i];
        } else {
            const size_t r = row(i);
            return {table + r * row_bytes, scales, r * groups, zeros, r * groups};
        }
    }
    float scale_at(const RowRef& ref, size_t group) const {
        const size_t at = ref.scale_first + group;
        switch (scale) {
        case Scale::f32: {
            float value;
            std::memcpy(&value, ref.scales + 4 * at, 4);
            return value;
        }
        case Scale::f16: {
            uint16_t half;
            std::memcpy(&half, ref.scales + 2 * at, 2);
            return f16_to_f32(half);
        }
        case Scale::e8m0: return e8m0_to_f32(ref.scales[at]);
        case Scale::e8m0_bits: return from_bits(static_cast<uint32_t>(ref.scales[at]) << 23);
        default: return 1.0f;
        }
    }
    float zero_at(const RowRef& ref, size_t group) const {
        const size_t at = ref.zero_first + group;
        switch (zero_point) {
        case ZeroPoint::u8: return ref.zeros[at];
        case ZeroPoint::u4: return static_cast<float>((ref.zeros[at >> 1] >> ((at & 1) * 4)) & 0xF);
        default: return 0.0f;
        }
    }
    // Software prefetch: a row's codes `distance` rows ahead, its scale and zero point (one line each,
    // elsewhere in memory) twice as far, so the three misses of a compressed row overlap.
    template <bool Tiered>
    ENGRAM_ALWAYS_INLINE void prefetch_codes(size_t i) const {
        const uint8_t* src = ref<Tiered>(i).codes;
        if (!src) return;  // a row the row API writes as zeros
        for (size_t line = 0; line < row_bytes; line += 64) ENGRAM_PREFETCH(src + line);
    }
    template <bool Tiered>
    ENGRAM_ALWAYS_INLINE void prefetch_parameters(size_t i) const {
        const RowRef at = ref<Tiered>(i);
        if (!at.codes) return;
        if (scale != Scale::none) ENGRAM_PREFETCH(at.scales + at.scale_first * bytes_of(scale));
        if (zero_point != ZeroPoint::none) ENGRAM_PREFETCH(at.zeros + at.zero_first * bits_of(zero_point) / 8);
    }
};

// One row, element type E, output Out: inlined into the per-target clones of decode_range.
template <Element E, typename Out>
ENGRAM_ALWAYS_INLINE void decode_row(const Job& job, const RowRef& ref, Out* out) {
    const uint8_t* src = ref.codes;
    const size_t n = job.row_size;
    if constexpr (E == Element::f32 || E == Element::f16 || E == Element::bf16) {
        if constexpr (E == Element::f32 && std::is_same_v<Out, float>) {
            std::memcpy(out, src, n * sizeof(float));
        } else if constexpr (E == Element::bf16 && std::is_same_v<Out, uint16_t>) {
            std::memcpy(out, src, n * sizeof(uint16_t));
        } else {
#pragma omp simd
            for (size_t j = 0; j < n; ++j) {
                float value;
                if constexpr (E == Element::f32) {
                    std::memcpy(&value, src + 4 * j, 4);
                } else {
                    uint16_t half;
                    std::memcpy(&half, src + 2 * j, 2);
                    value = E == Element::f16 ? f16_to_f32(half) : from_bits(static_cast<uint32_t>(half) << 16);
                }
                put(out, j, value);
            }
        }
    } else {
        const size_t size = job.group_size;
        for (size_t g = 0; g < job.groups; ++g) {
            const float scale = job.scale_at(ref, g), zero = job.zero_at(ref, g);
            const size_t base = g * size;
            if constexpr (E == Element::u4) {  // two codes per byte, low nibble first; groups are whole bytes
                const uint8_t* bytes = src + base / 2;
#pragma omp simd
                for (size_t k = 0; k < size / 2; ++k) {
                    put(out, base + 2 * k, (static_cast<float>(bytes[k] & 0xF) - zero) * scale);
                    put(out, base + 2 * k + 1, (static_cast<float>(bytes[k] >> 4) - zero) * scale);
                }
            } else {
#pragma omp simd
                for (size_t j = 0; j < size; ++j) {
                    const size_t at = base + j;
                    if constexpr (E == Element::u8) put(out, at, (static_cast<float>(src[at]) - zero) * scale);
                    else put(out, at, e4m3_to_f32(src[at]) * scale);
                }
            }
        }
    }
}

template <Element E, typename Out, bool Tiered>
ENGRAM_ALWAYS_INLINE void decode_rows(const Job& job, size_t begin, size_t end) {
    constexpr size_t distance = 16;  // measured on Zen 4: 16 to 64 alike, 4 and 8 slower
    for (size_t i = begin; i < std::min(end, begin + 2 * distance); ++i) {
        if (i < begin + distance) job.prefetch_codes<Tiered>(i);
        job.prefetch_parameters<Tiered>(i);
    }
    for (size_t i = begin; i < end; ++i) {
        if (i + distance < end) job.prefetch_codes<Tiered>(i + distance);
        if (i + 2 * distance < end) job.prefetch_parameters<Tiered>(i + 2 * distance);
        Out* out = reinterpret_cast<Out*>(job.out_row(i));
        const RowRef at = job.ref<Tiered>(i);
        if (Tiered && !at.codes) std::memset(out, 0, job.row_size * sizeof(Out));  // a row not served here
        else decode_row<E, Out>(job, at, out);
    }
}

template <typename Out, bool Tiered>
ENGRAM_ALWAYS_INLINE void decode_typed(const Job& job, size_t begin, size_t end) {
    switch (job.element) {
    case Element::f32: return decode_rows<Element::f32, Out, Tiered>(job, begin, end);
    case Element::f16: return decode_rows<Element::f16, Out, Tiered>(job, begin, end);
    case Element::bf16: return decode_rows<Element::bf16, Out, Tiered>(job, begin, end);
    case Element::u8: return decode_rows<Element::u8, Out, Tiered>(job, begin, end);
    case Element::u4: return decode_rows<Element::u4, Out, Tiered>(job, begin, end);
    case Element::e4m3: return decode_rows<Element::e4m3, Out, Tiered>(job, begin, end);
    default: return;
    }
}

ENGRAM_TARGET_CLONES
void decode_range(const Job& job, size_t begin, size_t end) {
    if (job.refs) {
        if (job.bf16_out) decode_typed<uint16_t, true>(job, begin, end);
        else decode_typed<float, true>(job, begin, end);
    } else {
        if (job.bf16_out) decode_typed<uint16_t, false>(job, begin, end);
        else decode_typed<float, false>(job, begin, end);
    }
}

// work(begin, end) over [0, count): a few rows in the calling thread, not worth waking the other threads
// for (B=50, T=1 is 800 demo rows: 2 threads win); more split over the plugin's threads
template <typename Work>
void over_rows(size_t count, const Work& work) {
    if (count < 256) {
        work(size_t{0}, count);
        return;
    }
    ov::parallel_nt(0, [&](const int thread, const int threads) {
        size_t begin = 0, end = 0;
        ov::splitter(count, threads, thread, begin, end);
        work(begin, end);
    });
}

// The stored bytes of one row: codes, then each group's scale, then each group's zero point (a byte).
void copy_stored(const Job& job, const RowRef& ref, uint8_t* out, uint32_t form) {
    const size_t scale_bytes = job.groups * bytes_of(job.scale);
    if (!ref.codes) {
        const size_t width = form == 3   ? job.row_bytes
                             : form == 4 ? scale_bytes
                                         : job.row_bytes + scale_bytes + (job.zero_point != ZeroPoint::none) * job.groups;
        std::memset(out, 0, width);
        return;
    }
    if (form != 4) {
        std::memcpy(out, ref.codes, job.row_bytes);
        out += job.row_bytes;
    }
    if (form != 3) std::memcpy(out, ref.scales + ref.scale_first * bytes_of(job.scale), scale_bytes);
    if (form == 2 && job.zero_point != ZeroPoint::none) {
        out += scale_bytes;
        for (size_t g = 0; g < job.groups; ++g) out[g] = static_cast<uint8_t>(job.zero_at(ref, g));
    }
}

void say(char* error, size_t size, const std::string& message) {
    if (size) std::snprintf(error, size, "%s", message.c_str());
}

}  // namespace

EngramGatherRows::EngramGatherRows(const ov::OutputVector& args, std::string element, int64_t row_size,
                                   std::string scale, int64_t group_size, std::string zero_point,
                                   ov::element::Type output_type, int64_t tier)
    : Op(args),
      m_element(std::move(element)),
      m_row_size(row_size),
      m_scale(std::move(scale)),
      m_group_size(group_size),
      m_zero_point(std::move(zero_point)),
      m_output_type(output_type),
      m_tier(tier) {
    constructor_validate_and_infer_types();
}

void EngramGatherRows::validate_and_infer_types() {
    const Element element = element_of(m_element);
    const Scale scale = scale_of(m_scale);
    const ZeroPoint zero_point = zero_point_of(m_zero_point);
    NODE_VALIDATION_CHECK(this, element != Element::unknown, "element must be f32, f16, bf16, u8, u4 or e4m3, got ",
                          m_element);
    NODE_VALIDATION_CHECK(this, scale != Scale::unknown, "scale must be none, f16, f32 or e8m0, got ", m_scale);
    NODE_VALIDATION_CHECK(this, zero_point != ZeroPoint::unknown, "zero_point must be none, u8 or u4, got ",
                          m_zero_point);
    const bool is_float = element == Element::f32 || element == Element::f16 || element == Element::bf16;
    NODE_VALIDATION_CHECK(this, !is_float || (scale == Scale::none && zero_point == ZeroPoint::none),
                          "a float table takes no scale or zero point");
    NODE_VALIDATION_CHECK(this, is_float || scale != Scale::none, "a ", m_element, " table needs a scale");
    NODE_VALIDATION_CHECK(this, (element == Element::e4m3) == (scale == Scale::e8m0),
                          "E8M0 scales go with E4M3 codes, and only with them");
    NODE_VALIDATION_CHECK(this, element != Element::e4m3 || zero_point == ZeroPoint::none,
                          "E4M3 codes take no zero point");
    NODE_VALIDATION_CHECK(this, m_row_size > 0 && m_group_size > 0 && m_row_size % m_group_size == 0,
                          "row_size must be a positive multiple of group_size, got ", m_row_size, " and ",
                          m_group_size);
    NODE_VALIDATION_CHECK(this, (m_row_size * bits_of(element)) % 8 == 0, "a row must be whole bytes");
    NODE_VALIDATION_CHECK(this, element != Element::u4 || m_group_size % 2 == 0,
                          "u4 groups must be whole bytes (an even group_size), got ", m_group_size);
    NODE_VALIDATION_CHECK(this, m_output_type == ov::element::f32 || m_output_type == ov::element::bf16,
                          "output_type must be f32 or bf16, got ", m_output_type);
    const size_t expected_inputs = 2 + (scale != Scale::none) + (zero_point != ZeroPoint::none);
    NODE_VALIDATION_CHECK(this, get_input_size() == expected_inputs, "expected ", expected_inputs,
                          " inputs (rows, table", scale != Scale::none ? ", scales" : "",
                          zero_point != ZeroPoint::none ? ", zero points" : "", "), got ", get_input_size());

    const auto rows_type = get_input_element_type(0);
    NODE_VALIDATION_CHECK(this, rows_type.is_dynamic() || rows_type == ov::element::i32 || rows_type == ov::element::i64,
                          "rows must be i32 or i64, got ", rows_type);
    const auto& rows = get_input_partial_shape(0);
    NODE_VALIDATION_CHECK(this, rows.rank().compatible(3), "rows must be [B, T, C], got ", rows);
    for (size_t i = 1; i < get_input_size(); ++i) {
        const auto type = get_input_element_type(i);
        NODE_VALIDATION_CHECK(this, type.is_dynamic() || type == ov::element::u8, "input ", i,
                              " must be the stored bytes (u8), got ", type);
    }
    const auto& table = get_input_partial_shape(1);
    const int64_t row_bytes = m_row_size * static_cast<int64_t>(bits_of(element)) / 8;
    NODE_VALIDATION_CHECK(this, table.compatible(ov::PartialShape{ov::Dimension::dynamic(), row_bytes}),
                          "table must be [rows, ", row_bytes, "] bytes, got ", table);
    if (table.rank().is_static() && table[0].is_static()) {
        const int64_t groups = table[0].get_length() * (m_row_size / m_group_size);
        if (scale != Scale::none)
            NODE_VALIDATION_CHECK(this, get_input_partial_shape(2).compatible(ov::PartialShape{
                                            groups * static_cast<int64_t>(bytes_of(scale))}),
                                  "scales must be one ", m_scale, " per group, ", groups, " in all; got ",
                                  get_input_partial_shape(2));
        if (zero_point != ZeroPoint::none)
            NODE_VALIDATION_CHECK(this, get_input_partial_shape(3).compatible(ov::PartialShape{
                                            (groups * static_cast<int64_t>(bits_of(zero_point)) + 7) / 8}),
                                  "zero points must be one ", m_zero_point, " per group, ", groups, " in all; got ",
                                  get_input_partial_shape(3));
    }
    ov::PartialShape out = rows.rank().is_static() ? rows : ov::PartialShape::dynamic(3);
    out.push_back(m_row_size);
    set_output_type(0, m_output_type, out);
}

std::shared_ptr<ov::Node> EngramGatherRows::clone_with_new_inputs(const ov::OutputVector& args) const {
    return std::make_shared<EngramGatherRows>(args, m_element, m_row_size, m_scale, m_group_size, m_zero_point,
                                              m_output_type, m_tier);
}

bool EngramGatherRows::visit_attributes(ov::AttributeVisitor& visitor) {
    visitor.on_attribute("element", m_element);
    visitor.on_attribute("row_size", m_row_size);
    visitor.on_attribute("scale", m_scale);
    visitor.on_attribute("group_size", m_group_size);
    visitor.on_attribute("zero_point", m_zero_point);
    visitor.on_attribute("output_type", m_output_type);
    visitor.on_attribute("tier", m_tier);
    return true;
}

bool EngramGatherRows::evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const {
    const auto& rows = inputs[0];
    const auto& table = inputs[1];
    Job job{};
    job.element = element_of(m_element);
    job.scale = scale_of(m_scale);
    job.zero_point = zero_point_of(m_zero_point);
    job.row_size = static_cast<size_t>(m_row_size);
    job.group_size = static_cast<size_t>(m_group_size);
    job.groups = job.row_size / job.group_size;
    job.row_bytes = job.row_size * bits_of(job.element) / 8;
    job.table_rows = table.get_shape()[0];
    job.table = static_cast<const uint8_t*>(table.data());
    size_t next = 2;
    job.scales = job.scale != Scale::none ? static_cast<const uint8_t*>(inputs[next++].data()) : nullptr;
    job.zeros = job.zero_point != ZeroPoint::none ? static_cast<const uint8_t*>(inputs[next++].data()) : nullptr;
    job.rows = rows.data();
    job.wide_rows = rows.get_element_type() == ov::element::i64;
    const size_t count = rows.get_size();
    // every row in range before any is read (the hash makes them so; this op may be fed by anything)
    for (size_t i = 0; i < count; ++i) {
        const int64_t r = job.wide_rows ? static_cast<const int64_t*>(job.rows)[i]
                                        : static_cast<const int32_t*>(job.rows)[i];
        OPENVINO_ASSERT(r >= 0 && static_cast<size_t>(r) < job.table_rows, "EngramGatherRows: row ", r,
                        " is out of range [0, ", job.table_rows, ")");
    }
    ov::Shape shape = rows.get_shape();
    shape.push_back(job.row_size);
    outputs[0].set_shape(shape);
    job.out = outputs[0].data();
    job.bf16_out = outputs[0].get_element_type() == ov::element::bf16;
    job.out_inner = std::max<size_t>(count, 1);
    job.out_strides[1] = job.row_size * (job.bf16_out ? 2 : 4);
    std::vector<RowRef> refs;
    std::vector<uint8_t> scratch;  // the rows read for this call
    if (m_tier != 0) {
        const auto tier = find_tier(m_tier);
        OPENVINO_ASSERT(tier, "EngramGatherRows: table tier ", m_tier, " is closed");
        OPENVINO_ASSERT(tier->table_rows() == job.table_rows, "EngramGatherRows: table tier ", m_tier, " has ",
                        tier->table_rows(), " rows, the table ", job.table_rows);
        tier->resolve(count, [&job](size_t i) { return static_cast<uint64_t>(job.row(i)); }, refs, scratch);
        job.refs = refs.data();
    }
    over_rows(count, [&job](size_t begin, size_t end) { decode_range(job, begin, end); });
    return true;
}

}  // namespace engram

extern "C" {

uint32_t engram_rows_abi_version() { return ENGRAM_ROWS_ABI_VERSION; }
size_t engram_rows_request_size() { return sizeof(EngramRowsRequest); }

int engram_guard_changed(const int* indices, size_t count, int* state);

int engram_rows_read(const EngramRowsRequest* request, char* error, size_t error_size) {
    using namespace engram;
    const EngramRowsRequest& r = *request;
    try {
        constexpr Element elements[] = {Element::f32, Element::f16, Element::bf16, Element::u8, Element::u4, Element::e4m3};
        constexpr Scale scales[] = {Scale::none, Scale::f16, Scale::f32, Scale::e8m0, Scale::e8m0_bits};
        constexpr ZeroPoint zeros[] = {ZeroPoint::none, ZeroPoint::u8, ZeroPoint::u4};
        if (r.element > 5 || r.scale > 4 || r.zero_point > 2 || r.form > 4 || !r.row_size || !r.group_size ||
            r.row_size % r.group_size || (r.ids_bytes != 4 && r.ids_bytes != 8) || !r.out_inner) {
            say(error, error_size, "malformed row request");
            return 1;
        }
        Job job{};
        job.element = elements[r.element];
        job.scale = scales[r.scale];
        job.zero_point = zeros[r.zero_point];
        job.row_size = r.row_size;
        job.group_size = r.group_size;
        job.groups = r.row_size / r.group_size;
        job.row_bytes = r.row_size * bits_of(job.element) / 8;
        job.table_rows = r.table_rows;
        job.table = r.parts[0];
        job.scales = r.parts[1];
        job.zeros = r.parts[2];
        job.rows = r.ids;
        job.wide_rows = r.ids_bytes == 8;
        job.out = r.out;
        job.bf16_out = r.form == 1;
        job.out_inner = r.out_inner;
        job.out_strides[0] = static_cast<size_t>(r.out_strides[0]);
        job.out_strides[1] = static_cast<size_t>(r.out_strides[1]);
        const size_t count = r.count;
        // every id checked before any row is read: -1 (the engines' dead id) or a row of the table
        std::vector<size_t> owned;
        owned.reserve(count);
        for (size_t i = 0; i < count; ++i) {
            const int64_t id = job.wide_rows ? static_cast<const int64_t*>(r.ids)[i] : static_cast<const int32_t*>(r.ids)[i];
            if (id < -1 || id >= static_cast<int64_t>(r.table_rows)) {
                say(error, error_size,
                    "row id " + std::to_string(id) + " (at index " + std::to_string(i) + ") is outside the table's " +
                        std::to_string(r.table_rows) + " rows (-1 is the engines' dead id; anything else must be a row)");
                return 1;
            }
            if (id >= 0 && id >= r.owned[0] && id < r.owned[1]) owned.push_back(i);
        }
        if (r.counts) std::fill(r.counts, r.counts + ENGRAM_CALL_COUNT, 0);
        std::vector<RowRef> refs(count, RowRef{nullptr, nullptr, 0, nullptr, 0});
        std::vector<RowRef> found;
        std::vector<uint8_t> scratch;  // the rows a tier read for this call
        if (r.tier != 0) {
            const auto tier = find_tier(r.tier);
            if (!tier) {
                say(error, error_size, "table tier " + std::to_string(r.tier) + " is closed");
                return 1;
            }
            tier->resolve(owned.size(), [&job, &owned](size_t k) { return static_cast<uint64_t>(job.row(owned[k])); },
                          found, scratch, r.counts);
            for (size_t k = 0; k < owned.size(); ++k) refs[owned[k]] = found[k];
        } else {
            if (r.counts) r.counts[ENGRAM_CALL_RESIDENT] = owned.size();
            for (size_t i : owned) {
                const size_t row = job.row(i);
                refs[i] = {job.table + row * job.row_bytes, job.scales, row * job.groups, job.zeros, row * job.groups};
            }
        }
        job.refs = refs.data();
        auto work = [&job, &r](size_t begin, size_t end) {
            if (r.form <= 1) {
                decode_range(job, begin, end);
            } else {
                for (size_t i = begin; i < end; ++i) copy_stored(job, job.refs[i], job.out_row(i), r.form);
            }
        };
        over_rows(count, work);
        if (r.guard_count) {
            int state = 0;
            if (engram_guard_changed(r.guards, r.guard_count, &state) >= 0) return 2;
        }
        return 0;
    } catch (const std::exception& exc) {
        say(error, error_size, exc.what());
        return 1;
    }
}
}
