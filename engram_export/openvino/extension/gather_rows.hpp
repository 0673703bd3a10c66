// EngramGatherRows: table rows -> dequantized values, for every form an Engram table is stored in.
//
// OpenVINO's CPU plugin gathers a plain f32 table with a fast kernel, but a compressed one (u8/u4 with
// per-row scales after NNCF, an f16 table in a bf16 IR, FP8 codes with E8M0 block scales) goes through
// a reference kernel or a chain of [B,T,C,d]-sized decode ops: 3-4x the time of the f32 Gather while
// reading 4-8x fewer bytes. This op reads the stored bytes of each looked-up row once, with software
// prefetch ahead of the rows it decodes, on all the plugin's threads, and writes the values in the
// precision the fuse stage reads (f32 or bf16).
//
// Inputs: rows [B,T,C] (i32 or i64), table u8 [R, row bytes] (the stored bytes: f32, f16, bf16, u8,
// u4 two per byte low nibble first, or FP8 E4M3), optionally scales u8 [R * groups * scale bytes] (f16,
// f32 or E8M0), optionally zero points u8 [ceil(R * groups * bits / 8)] (u8 or u4, packed across rows as
// OpenVINO packs u4). Every table is passed as bytes: the CPU plugin keeps a u8 constant as it is (no
// precision conversion, no copy), so a table mapped from its file stays the file's pages.
// Output [B,T,C,row_size]: value = (code - zero point) * scale, computed in f32, rounded to nearest
// even for a bf16 output; E4M3 = the code's value times its block's power of two.
// Attribute `tier` (0: none): the id of a table tier (table_tier.hpp) that says where each row's stored
// bytes are (hot rows in memory, a cache, the rest read from the file) instead of the table inputs.

#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "openvino/op/op.hpp"

namespace engram {

class EngramGatherRows : public ov::op::Op {
public:
    OPENVINO_OP("EngramGatherRows", "engram_extension");

    EngramGatherRows() = default;
    EngramGatherRows(const ov::OutputVector& args, std::string element, int64_t row_size, std::string scale,
                     int64_t group_size, std::string zero_point, ov::element::Type output_type, int64_t tier = 0);

    void validate_and_infer_types() override;
    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override;
    bool visit_attributes(ov::AttributeVisitor& visitor) override;
    bool has_evaluate() const override { return true; }
    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override;

private:
    std::string m_element = "f32";      // f32 | f16 | bf16 | u8 | u4 | e4m3
    int64_t m_row_size = 1;             // values per row
    std::string m_scale = "none";       // none | f16 | f32 | e8m0
    int64_t m_group_size = 1;           // values per scale (and zero point)
    std::string m_zero_point = "none";  // none | u8 | u4
    ov::element::Type m_output_type = ov::element::f32;
    int64_t m_tier = 0;  // a process's tier id: meaningless in a saved model, set at load
};

}  // namespace engram

// The row API (runtime/rows.py): the same reader, called directly (ctypes), for a caller that wants rows,
// not a lookup stage's embeddings: row ids as the engines number them, and rows written into the
// caller's buffer as stored (packed codes + scales + zero points, or one part alone) or decoded.
// Mirrored by openvino/row_reader.py, which refuses a library whose engram_rows_abi_version or
// engram_rows_request_size differs: raise ENGRAM_ROWS_ABI_VERSION with any change to the struct.
extern "C" {

#define ENGRAM_ROWS_ABI_VERSION 2
struct EngramRowsRequest {
    // the table: element 0 f32, 1 f16, 2 bf16, 3 u8, 4 u4, 5 e4m3; scale 0 none, 1 f16, 2 f32, 3 e8m0,
    // 4 e8m0 read as vLLM does (0: 0.0, 255: inf); zero point 0 none, 1 u8, 2 u4
    uint32_t element, scale, zero_point;
    // the form written: 0 f32, 1 bf16, 2 packed (codes, scales, zero points a byte each), 3 codes, 4 scales
    uint32_t form;
    uint64_t row_size, group_size, table_rows;
    int64_t tier;              // a tier (table_tier.hpp) that finds the rows; 0: the parts below
    const uint8_t* parts[3];   // codes [R, row bytes], scales (flat), zero points (packed as OpenVINO packs u4)
    const void* ids;           // i32 or i64 (ids_bytes), `count` of them
    uint64_t ids_bytes, count;
    int64_t owned[2];          // ids in [owned[0], owned[1]) are read; -1 and the others give zero rows
    uint8_t* out;              // row i at out + (i / out_inner) * out_strides[0] + (i % out_inner) * out_strides[1]
    uint64_t out_inner;
    int64_t out_strides[2];
    const int* guards;         // file guards (file_guard.cpp) checked once the rows are written
    uint64_t guard_count;
    uint64_t* counts;          // null, or ENGRAM_CALL_COUNT counts of this call (EngramCallCount, table_tier.hpp)
};

uint32_t engram_rows_abi_version();
size_t engram_rows_request_size();
// 0: done; 1: refused or failed before writing (error says why, in one line; the ids are checked before
// any row is read); 2: written, but a guarded file changed (the caller names it from its guard)
int engram_rows_read(const EngramRowsRequest* request, char* error, size_t error_size);
}
