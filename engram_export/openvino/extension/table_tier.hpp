// A table served in tiers (table_memory="tiered", openvino/tiered.py): the hot rows that calibration
// chose live packed in memory and are found in O(1) through a bitmap with a rank per 512 rows; rows read
// lately may be kept in a bounded CLOCK cache; every other row is read from the table file. A call's
// misses are read at once: a row whose pages are in the page cache is read in the calling thread
// (preadv2 with RWF_NOWAIT); the rest (miss_reads) are read on a pool of I/O threads, all at once; or
// all handed to the kernel's readahead first (posix_fadvise WILLNEED: in flight at once, no thread per
// read) and then read in the calling thread; or submitted as one batch to an io_uring of the calling
// thread (a read per row part, all in flight, one wait). Rows come back in their stored form (codes,
// scales, zero points) and EngramGatherRows decodes them as it decodes the file's.
//
// engram_tier_warm reads rows (a caller's candidates for its next calls) into the cache ahead of need,
// marked: the first lookup that finds a marked row counts it as a candidate hit, not a cache hit, and
// clears the mark. Counters, over lookups: lookups == hot_hits + cache_hits + candidate_hits +
// read_lookups (lookups served by a row read in their own call; rows_read counts those rows once a call).
// Rows warm reads count in warm_rows_read only (not rows_read, bytes_read or the read times).
//
// Python makes a tier with engram_tier_open (ctypes) and passes its id to EngramGatherRows as the
// attribute `tier`; the memory of the hot rows belongs to Python and must outlive the tier.

#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

extern "C" {

// Mirrored by openvino/tiered.py (ctypes), which refuses a library whose engram_tier_abi_version or
// engram_tier_spec_size differs from its copy's: raise ENGRAM_TIER_ABI_VERSION with any change to this
// struct (a field added, removed, retyped or moved), here and in tiered.py at once.
// Parts: 0 codes, 1 scales, 2 zero points.
#define ENGRAM_TIER_ABI_VERSION 2
struct EngramTierSpec {
    uint64_t table_rows;
    uint64_t part_bytes[2];   // bytes per row of the codes and of the scales (0: none)
    uint64_t zero_bits;       // zero-point bits per row (0: none)
    uint64_t zero_value_bits; // 8 (u8) or 4 (u4, packed two per byte across rows)
    int32_t fds[3];           // the files of the parts (-1: none); reopened, the caller keeps its own
    uint64_t offsets[3];      // where each part starts in its file
    const uint8_t* memory[3]; // a part held in memory instead of a file (a table inside the model file)
    const uint64_t* hot_bits; // one bit per table row
    const uint64_t* hot_ranks;  // set bits before each block of 512 rows
    uint64_t hot_rows;
    const uint8_t* hot_parts[3];  // the hot rows packed in row order, in the parts' stored form
    uint64_t cache_bytes;     // the CLOCK cache of rows read (0: none)
    uint32_t io_threads;      // reads in flight at once on the pool (miss_reads 0)
    uint32_t miss_reads;      // 0 a pool of io_threads, 1 the kernel's readahead then read, 2 io_uring,
                              // 3 io_uring where this process may use it, else readahead
};

// Statistics, in this order, for engram_tier_stats (tiered.STATS)
enum EngramTierStat {
    ENGRAM_LOOKUPS, ENGRAM_HOT_HITS, ENGRAM_CACHE_HITS, ENGRAM_ROWS_READ, ENGRAM_BYTES_READ,
    ENGRAM_PAGE_CACHE_ROWS, ENGRAM_QUEUED_ROWS, ENGRAM_READ_NS, ENGRAM_CALLS, ENGRAM_CANDIDATE_HITS,
    ENGRAM_READ_LOOKUPS, ENGRAM_WARM_CALLS, ENGRAM_WARM_ROWS_READ, ENGRAM_STAT_COUNT
};

// One call's own counts (engram_rows_read's `counts`, row_reader.COUNTS), in this order: lookups of rows
// held resident (a table that is not tiered: every row it looks up), hot, cache, candidate and read
// (hot + cache + candidate + read + resident == the call's lookups), then the distinct rows it read, those
// of them found in the page cache, and the nanoseconds it waited for the others.
enum EngramCallCount {
    ENGRAM_CALL_RESIDENT, ENGRAM_CALL_HOT, ENGRAM_CALL_CACHE, ENGRAM_CALL_CANDIDATE, ENGRAM_CALL_READ,
    ENGRAM_CALL_ROWS_READ, ENGRAM_CALL_PAGE_CACHE_ROWS, ENGRAM_CALL_READ_NS, ENGRAM_CALL_COUNT
};

uint32_t engram_tier_abi_version();
size_t engram_tier_spec_size();
int64_t engram_tier_open(const EngramTierSpec* spec, char* error, size_t error_size);
int engram_tier_close(int64_t id);
int engram_tier_stats(int64_t id, uint64_t* out, size_t count);
// Reads `rows` (-1 skipped) that are neither hot nor cached into the cache, marked as candidates; returns
// the rows read, or -1 (error says why: a closed tier, a row outside the table, refused before any read;
// a read that failed). A tier without a cache reads nothing.
int64_t engram_tier_warm(int64_t id, const int64_t* rows, size_t count, char* error, size_t error_size);
}

namespace engram {

// Where one looked-up row's stored bytes are: codes, scales (group g at scales[scale_first + g]), zero
// points (group g at index zero_first + g of their packed array).
struct RowRef {
    const uint8_t* codes;
    const uint8_t* scales;
    size_t scale_first;
    const uint8_t* zeros;
    size_t zero_first;
};

class Tier {
public:
    explicit Tier(const EngramTierSpec& spec);
    ~Tier();
    uint64_t table_rows() const { return m_spec.table_rows; }
    // RowRefs of `count` lookups (row(i) gives each one's row); the rows not in memory are read into
    // `scratch`, which must live while the refs are used; `counts` (null: none) gets the call's own
    // (EngramCallCount, added to). Throws on a read error.
    void resolve(size_t count, const std::function<uint64_t(size_t)>& row, std::vector<RowRef>& refs,
                 std::vector<uint8_t>& scratch, uint64_t* counts = nullptr);
    // Rows (checked in range, unique) into the cache as candidates; returns the rows read.
    uint64_t warm(std::vector<uint64_t> rows);
    void stats(uint64_t* out, size_t count) const;

private:
    struct Impl;
    EngramTierSpec m_spec;
    std::unique_ptr<Impl> m_impl;
};

std::shared_ptr<Tier> find_tier(int64_t id);

}  // namespace engram
