// The tiers of a table (see table_tier.hpp): hot rows by bitmap and rank, a CLOCK cache, reads.

#include "table_tier.hpp"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "miss_reads.hpp"

namespace engram {
namespace {

// Rows read lately, `slots` records of `record` bytes, evicted in CLOCK order. Not thread-safe.
class RowCache {
public:
    RowCache(size_t slots, size_t record)
        : m_slots(slots), m_record(record), m_data(slots * record), m_row_of(slots, kEmpty), m_used(slots, 0),
          m_candidate(slots, 0) {
        m_where.reserve(slots);
    }

    bool enabled() const { return m_slots > 0; }

    bool contains(uint64_t row) const { return m_where.count(row) > 0; }

    // 0: not cached; 1: cached; 2: cached by a warm and not found since (the mark is cleared)
    int get(uint64_t row, uint8_t* out) {
        const auto found = m_where.find(row);
        if (found == m_where.end()) return 0;
        const size_t slot = found->second;
        m_used[slot] = 1;
        std::memcpy(out, m_data.data() + slot * m_record, m_record);
        const int candidate = m_candidate[slot];
        m_candidate[slot] = 0;
        return 1 + candidate;
    }

    void put(uint64_t row, const uint8_t* record, bool candidate) {
        if (m_where.count(row)) return;
        while (m_used[m_hand]) {  // a second chance for every slot used since the hand last passed
            m_used[m_hand] = 0;
            m_hand = (m_hand + 1) % m_slots;
        }
        if (m_row_of[m_hand] != kEmpty) m_where.erase(m_row_of[m_hand]);
        m_row_of[m_hand] = row;
        m_candidate[m_hand] = candidate;
        m_where[row] = m_hand;
        std::memcpy(m_data.data() + m_hand * m_record, record, m_record);
        m_hand = (m_hand + 1) % m_slots;
    }

private:
    static constexpr uint64_t kEmpty = ~uint64_t{0};
    size_t m_slots, m_record;
    std::vector<uint8_t> m_data;
    std::vector<uint64_t> m_row_of;
    std::vector<uint8_t> m_used, m_candidate;
    std::unordered_map<uint64_t, size_t> m_where;
    size_t m_hand = 0;
};

constexpr size_t kCacheEntryOverhead = 64;  // the index's bytes per cached row, counted in the budget

std::mutex g_tiers_mutex;
std::map<int64_t, std::shared_ptr<Tier>> g_tiers;
int64_t g_next_tier = 1;

}  // namespace

struct Tier::Impl {
    const EngramTierSpec* spec = nullptr;
    int fds[3] = {-1, -1, -1};
    size_t zero_bytes = 0, record = 0;
    std::mutex cache_mutex;
    std::unique_ptr<RowCache> cache;
    std::atomic<uint64_t> stats[ENGRAM_STAT_COUNT] = {};

    struct Part {
        uint64_t offset, bytes, at;  // in its file (or memory), its length, where it goes in the record
    };
    Part part(int p, uint64_t r) const {
        const EngramTierSpec& s = *spec;
        const uint64_t zero_bit = r * s.zero_bits;
        if (p == 0) return {s.offsets[0] + r * s.part_bytes[0], s.part_bytes[0], 0};
        if (p == 1) return {s.offsets[1] + r * s.part_bytes[1], s.part_bytes[1], s.part_bytes[0]};
        return {s.offsets[2] + zero_bit / 8, (zero_bit % 8 + s.zero_bits + 7) / 8, s.part_bytes[0] + s.part_bytes[1]};
    }

    // Where hot row r is among the packed hot rows, or -1 if it is not hot.
    int64_t hot_place(uint64_t r) const {
        const EngramTierSpec& s = *spec;
        const uint64_t word = r >> 6, bit = r & 63;
        if (!s.hot_rows || !(s.hot_bits[word] >> bit & 1)) return -1;
        uint64_t h = s.hot_ranks[r >> 9];
        for (uint64_t w = (r >> 9) << 3; w < word; ++w) h += __builtin_popcountll(s.hot_bits[w]);
        return static_cast<int64_t>(h + __builtin_popcountll(s.hot_bits[word] & ((uint64_t{1} << bit) - 1)));
    }

    struct Reads {
        uint64_t page_cache = 0, queued = 0, ns = 0;
    };
    // Row rows[u] into the record at outs[u], for every u: those in the page cache in this thread, the
    // others as miss_reads says, all at once. Throws on a read error.
    Reads read(const std::vector<uint64_t>& rows, const std::vector<uint8_t*>& outs);
};

Tier::Impl::Reads Tier::Impl::read(const std::vector<uint64_t>& rows, const std::vector<uint8_t*>& outs) {
    const EngramTierSpec& s = *spec;
    std::atomic<bool> failed{false};
    std::string error;
    std::mutex error_mutex;
    // each part of row u into its record; false where RWF_NOWAIT found a page not in the page cache
    auto read_row = [&](size_t u, int flags) {
        for (int p = 0; p < 3; ++p) {
            const Part at = part(p, rows[u]);
            if (fds[p] < 0) {
                if (s.memory[p]) std::memcpy(outs[u] + at.at, s.memory[p] + at.offset, at.bytes);
                continue;
            }
            struct iovec span = {outs[u] + at.at, at.bytes};
            ssize_t got;
            do got = preadv2(fds[p], &span, 1, static_cast<off_t>(at.offset), flags);
            while (got < 0 && errno == EINTR);
            if (got == static_cast<ssize_t>(at.bytes)) continue;
            if (flags) return false;  // not all in the page cache (or not supported): read it as miss_reads says
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!failed.exchange(true))
                error = "reading row " + std::to_string(rows[u]) + " of the table file: " +
                        (got < 0 ? std::string(strerror(errno)) : "the file ends before it (truncated?)");
            return false;
        }
        return true;
    };
    Reads reads;
    std::vector<size_t> queued;
    for (size_t u = 0; u < rows.size(); ++u)
        if (!read_row(u, RWF_NOWAIT)) queued.push_back(u);
    reads.page_cache = rows.size() - queued.size();
    if (queued.empty()) return reads;
    const auto start = std::chrono::steady_clock::now();
    if (s.miss_reads == 1) {
        for (size_t u : queued)  // every read in flight at once, then each waits for its own pages
            for (int p = 0; p < 3; ++p) {
                const Part at = part(p, rows[u]);
                if (fds[p] >= 0)
                    posix_fadvise(fds[p], static_cast<off_t>(at.offset), static_cast<off_t>(at.bytes),
                                  POSIX_FADV_WILLNEED);
            }
        for (size_t u : queued) read_row(u, 0);
    } else if (s.miss_reads == 2) {
        std::vector<Ring::Span> spans;
        std::vector<size_t> span_row;
        for (size_t u : queued)
            for (int p = 0; p < 3; ++p) {
                const Part at = part(p, rows[u]);
                if (fds[p] >= 0) {
                    spans.push_back({fds[p], at.offset, static_cast<uint32_t>(at.bytes), outs[u] + at.at});
                    span_row.push_back(u);
                } else if (s.memory[p]) {
                    std::memcpy(outs[u] + at.at, s.memory[p] + at.offset, at.bytes);
                }
            }
        std::vector<uint8_t> full;
        Ring::of_thread(spans.size()).read(spans, full);
        size_t last = rows.size();
        for (size_t i = 0; i < spans.size(); ++i)  // short or failed: again the plain way, which says why
            if (!full[i] && span_row[i] != last) read_row(last = span_row[i], 0);
    } else {
        ReadPool::with_threads(0).run(queued.size(), std::max<uint32_t>(1, s.io_threads),
                                      [&](size_t k) { read_row(queued[k], 0); });
    }
    reads.queued = queued.size();
    reads.ns = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count());
    if (failed) throw std::runtime_error(error);
    return reads;
}

Tier::Tier(const EngramTierSpec& spec) : m_spec(spec), m_impl(std::make_unique<Impl>()) {
    m_impl->spec = &m_spec;
    const bool present[3] = {spec.part_bytes[0] > 0, spec.part_bytes[1] > 0, spec.zero_bits > 0};
    if (spec.table_rows == 0 || !present[0]) throw std::invalid_argument("a tier needs a table with rows");
    for (int p = 0; p < 3; ++p)
        if (present[p] != (spec.fds[p] >= 0 || spec.memory[p] != nullptr))
            throw std::invalid_argument("every part of the table needs its file or memory, and only those");
    if (spec.zero_bits && spec.zero_value_bits != 4 && spec.zero_value_bits != 8)
        throw std::invalid_argument("zero points must be u4 or u8");
    if (spec.hot_rows && (!spec.hot_bits || !spec.hot_ranks || !spec.hot_parts[0] ||
                          (spec.part_bytes[1] && !spec.hot_parts[1]) || (spec.zero_bits && !spec.hot_parts[2])))
        throw std::invalid_argument("hot rows need their bitmap, ranks and packed parts");
    if (spec.miss_reads > 3) throw std::invalid_argument("miss_reads must be 0 to 3 (threads, readahead, uring, auto)");
    if (spec.miss_reads >= 2) {
        const std::string why = Ring::unavailable();
        if (spec.miss_reads == 3) m_spec.miss_reads = why.empty() ? 2 : 1;
        else if (!why.empty()) throw std::runtime_error("miss_reads='uring': io_uring is not available here (" + why + ")");
    }
    for (int p = 0; p < 3; ++p) {
        if (spec.fds[p] < 0) continue;
        m_impl->fds[p] = open(("/proc/self/fd/" + std::to_string(spec.fds[p])).c_str(), O_RDONLY | O_CLOEXEC);
        if (m_impl->fds[p] < 0) throw std::runtime_error(std::string("cannot use the table file: ") + strerror(errno));
        // a row is a few hundred bytes at a random place: no readahead around it (the kernel's default
        // would read 128 KiB or more for each miss, on a file description of our own)
        posix_fadvise(m_impl->fds[p], 0, 0, POSIX_FADV_RANDOM);
    }
    m_impl->zero_bytes = spec.zero_bits ? (7 + spec.zero_bits + 7) / 8 : 0;  // room for a nibble's offset
    m_impl->record = spec.part_bytes[0] + spec.part_bytes[1] + m_impl->zero_bytes;
    m_impl->cache = std::make_unique<RowCache>(spec.cache_bytes / (m_impl->record + kCacheEntryOverhead),
                                               m_impl->record);
    if (spec.miss_reads == 0) ReadPool::with_threads(std::max<uint32_t>(1, spec.io_threads));
}

Tier::~Tier() {
    for (int fd : m_impl->fds)
        if (fd >= 0) close(fd);
}

void Tier::resolve(size_t count, const std::function<uint64_t(size_t)>& row, std::vector<RowRef>& refs,
                   std::vector<uint8_t>& scratch, uint64_t* counts) {
    const EngramTierSpec& spec = m_spec;
    Impl& impl = *m_impl;
    refs.resize(count);
    impl.stats[ENGRAM_CALLS] += 1;
    impl.stats[ENGRAM_LOOKUPS] += count;

    // hot rows: bit r of the bitmap; their place is the number of set bits before r
    std::vector<std::pair<uint64_t, size_t>> missed;  // (row, lookup)
    const uint64_t zeros_per_row = spec.zero_bits ? spec.zero_bits / spec.zero_value_bits : 0;
    for (size_t i = 0; i < count; ++i) {
        const uint64_t r = row(i);
        const int64_t place = impl.hot_place(r);
        if (place < 0) {
            missed.emplace_back(r, i);
            continue;
        }
        const uint64_t h = static_cast<uint64_t>(place);
        refs[i] = {spec.hot_parts[0] + h * spec.part_bytes[0], spec.hot_parts[1] + h * spec.part_bytes[1], 0,
                   spec.hot_parts[2], h * zeros_per_row};
    }
    uint64_t call[ENGRAM_CALL_COUNT] = {};
    call[ENGRAM_CALL_HOT] = count - missed.size();
    impl.stats[ENGRAM_HOT_HITS] += call[ENGRAM_CALL_HOT];
    if (!missed.empty()) {
        std::sort(missed.begin(), missed.end());
        std::vector<uint64_t> unique;
        std::vector<size_t> slot(missed.size());
        for (size_t k = 0; k < missed.size(); ++k) {
            if (unique.empty() || unique.back() != missed[k].first) unique.push_back(missed[k].first);
            slot[k] = unique.size() - 1;
        }
        const size_t record = impl.record;
        scratch.assign(unique.size() * record, 0);
        std::vector<uint8_t> cached(unique.size(), 0);  // RowCache::get's answer
        if (impl.cache->enabled()) {
            std::lock_guard<std::mutex> lock(impl.cache_mutex);
            for (size_t u = 0; u < unique.size(); ++u)
                cached[u] = static_cast<uint8_t>(impl.cache->get(unique[u], &scratch[u * record]));
        }
        for (size_t k = 0; k < missed.size(); ++k)
            call[cached[slot[k]] == 0 ? ENGRAM_CALL_READ : cached[slot[k]] == 1 ? ENGRAM_CALL_CACHE
                                                                                 : ENGRAM_CALL_CANDIDATE] += 1;
        impl.stats[ENGRAM_CACHE_HITS] += call[ENGRAM_CALL_CACHE];
        impl.stats[ENGRAM_CANDIDATE_HITS] += call[ENGRAM_CALL_CANDIDATE];
        std::vector<uint64_t> rows;
        std::vector<uint8_t*> outs;
        for (size_t u = 0; u < unique.size(); ++u)
            if (!cached[u]) rows.push_back(unique[u]), outs.push_back(&scratch[u * record]);
        if (!rows.empty()) {
            const Impl::Reads reads = impl.read(rows, outs);
            impl.stats[ENGRAM_PAGE_CACHE_ROWS] += reads.page_cache;
            impl.stats[ENGRAM_QUEUED_ROWS] += reads.queued;
            impl.stats[ENGRAM_READ_NS] += reads.ns;
            call[ENGRAM_CALL_ROWS_READ] = rows.size();
            call[ENGRAM_CALL_PAGE_CACHE_ROWS] = reads.page_cache;
            call[ENGRAM_CALL_READ_NS] = reads.ns;
        }
        impl.stats[ENGRAM_READ_LOOKUPS] += call[ENGRAM_CALL_READ];
        impl.stats[ENGRAM_ROWS_READ] += rows.size();
        impl.stats[ENGRAM_BYTES_READ] +=
            rows.size() * (spec.part_bytes[0] + spec.part_bytes[1] + (spec.zero_bits + 7) / 8);
        if (impl.cache->enabled() && !rows.empty()) {
            std::lock_guard<std::mutex> lock(impl.cache_mutex);
            for (size_t u = 0; u < rows.size(); ++u) impl.cache->put(rows[u], outs[u], false);
        }
        for (size_t k = 0; k < missed.size(); ++k) {
            const uint64_t r = missed[k].first;
            const uint8_t* out = &scratch[slot[k] * record];
            refs[missed[k].second] = {out, out + spec.part_bytes[0], 0, out + spec.part_bytes[0] + spec.part_bytes[1],
                                      spec.zero_bits ? (r * spec.zero_bits % 8) / spec.zero_value_bits : 0};
        }
    }
    if (counts)
        for (int c = 0; c < ENGRAM_CALL_COUNT; ++c) counts[c] += call[c];
}

uint64_t Tier::warm(std::vector<uint64_t> rows) {
    Impl& impl = *m_impl;
    if (!impl.cache->enabled()) return 0;  // nowhere to keep them
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
    std::vector<uint64_t> wanted;
    {
        std::lock_guard<std::mutex> lock(impl.cache_mutex);
        for (uint64_t r : rows)
            if (impl.hot_place(r) < 0 && !impl.cache->contains(r)) wanted.push_back(r);
    }
    impl.stats[ENGRAM_WARM_CALLS] += 1;
    if (wanted.empty()) return 0;
    std::vector<uint8_t> records(wanted.size() * impl.record, 0);
    std::vector<uint8_t*> outs(wanted.size());
    for (size_t u = 0; u < wanted.size(); ++u) outs[u] = &records[u * impl.record];
    impl.read(wanted, outs);
    {
        std::lock_guard<std::mutex> lock(impl.cache_mutex);
        for (size_t u = 0; u < wanted.size(); ++u) impl.cache->put(wanted[u], outs[u], true);
    }
    impl.stats[ENGRAM_WARM_ROWS_READ] += wanted.size();
    return wanted.size();
}

void Tier::stats(uint64_t* out, size_t count) const {
    for (size_t i = 0; i < std::min<size_t>(count, ENGRAM_STAT_COUNT); ++i) out[i] = m_impl->stats[i].load();
}

std::shared_ptr<Tier> find_tier(int64_t id) {
    std::lock_guard<std::mutex> lock(g_tiers_mutex);
    const auto found = g_tiers.find(id);
    return found == g_tiers.end() ? nullptr : found->second;
}

}  // namespace engram

extern "C" {

uint32_t engram_tier_abi_version() { return ENGRAM_TIER_ABI_VERSION; }

size_t engram_tier_spec_size() { return sizeof(EngramTierSpec); }

int64_t engram_tier_open(const EngramTierSpec* spec, char* error, size_t error_size) {
    try {
        auto tier = std::make_shared<engram::Tier>(*spec);
        std::lock_guard<std::mutex> lock(engram::g_tiers_mutex);
        const int64_t id = engram::g_next_tier++;
        engram::g_tiers[id] = std::move(tier);
        return id;
    } catch (const std::exception& exc) {
        if (error && error_size) {
            std::strncpy(error, exc.what(), error_size - 1);
            error[error_size - 1] = '\0';
        }
        return 0;
    }
}

int engram_tier_close(int64_t id) {
    std::lock_guard<std::mutex> lock(engram::g_tiers_mutex);
    return engram::g_tiers.erase(id) ? 0 : -1;
}

int engram_tier_stats(int64_t id, uint64_t* out, size_t count) {
    const auto tier = engram::find_tier(id);
    if (!tier) return -1;
    tier->stats(out, count);
    return 0;
}

int64_t engram_tier_warm(int64_t id, const int64_t* rows, size_t count, char* error, size_t error_size) {
    auto say = [error, error_size](const std::string& message) {
        if (error && error_size) std::snprintf(error, error_size, "%s", message.c_str());
        return int64_t{-1};
    };
    const auto tier = engram::find_tier(id);
    if (!tier) return say("table tier " + std::to_string(id) + " is closed");
    std::vector<uint64_t> wanted;
    wanted.reserve(count);
    for (size_t i = 0; i < count; ++i) {  // every row checked before any is read
        if (rows[i] == -1) continue;
        if (rows[i] < 0 || static_cast<uint64_t>(rows[i]) >= tier->table_rows())
            return say("row " + std::to_string(rows[i]) + " (at index " + std::to_string(i) + ") is outside the table's " +
                       std::to_string(tier->table_rows()) + " rows (-1 is skipped; anything else must be a row)");
        wanted.push_back(static_cast<uint64_t>(rows[i]));
    }
    try {
        return static_cast<int64_t>(tier->warm(std::move(wanted)));
    } catch (const std::exception& exc) {
        return say(exc.what());
    }
}
}
