// The tiers of a table (see table_tier.hpp): hot rows by bitmap and rank, a CLOCK cache, reads.

#include "table_tier.hpp"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>

namespace engram {
namespace {

// Threads that only wait on reads, shared by every tier of the process; never destroyed (a detached
// thread must not outlive what it uses, and static destructors run in an unknown order).
class ReadPool {
public:
    static ReadPool& with_threads(size_t threads) {
        static ReadPool* pool = new ReadPool();
        pool->grow(threads);
        return *pool;
    }

    // work(i) for every i < n, at most `width` at once; returns when every one has returned.
    void run(size_t n, size_t width, const std::function<void(size_t)>& work) {
        struct Batch {
            std::atomic<size_t> next{0};
            std::mutex mutex;
            std::condition_variable done;
            size_t running = 0;
        } batch;
        const size_t tasks = std::max<size_t>(1, std::min(n, width));
        batch.running = tasks;
        for (size_t t = 0; t < tasks; ++t) {
            {
                std::lock_guard<std::mutex> lock(m_mutex);
                m_queue.emplace_back([&batch, &work, n] {
                    for (size_t i = batch.next++; i < n; i = batch.next++) work(i);
                    std::lock_guard<std::mutex> finished(batch.mutex);
                    if (--batch.running == 0) batch.done.notify_one();
                });
            }
            m_ready.notify_one();  // a thread per task: the others sleep on (no herd of 64 for 3 reads)
        }
        std::unique_lock<std::mutex> lock(batch.mutex);
        batch.done.wait(lock, [&batch] { return batch.running == 0; });
    }

private:
    void grow(size_t threads) {
        std::lock_guard<std::mutex> lock(m_mutex);
        for (; m_threads < threads; ++m_threads) std::thread([this] { loop(); }).detach();
    }

    void loop() {
        for (;;) {
            std::function<void()> task;
            {
                std::unique_lock<std::mutex> lock(m_mutex);
                m_ready.wait(lock, [this] { return !m_queue.empty(); });
                task = std::move(m_queue.front());
                m_queue.pop_front();
            }
            task();
        }
    }

    std::mutex m_mutex;
    std::condition_variable m_ready;
    std::deque<std::function<void()>> m_queue;
    size_t m_threads = 0;
};

// Rows read lately, `slots` records of `record` bytes, evicted in CLOCK order. Not thread-safe.
class RowCache {
public:
    RowCache(size_t slots, size_t record)
        : m_slots(slots), m_record(record), m_data(slots * record), m_row_of(slots, kEmpty), m_used(slots, 0) {
        m_where.reserve(slots);
    }

    bool enabled() const { return m_slots > 0; }

    bool get(uint64_t row, uint8_t* out) {
        const auto found = m_where.find(row);
        if (found == m_where.end()) return false;
        m_used[found->second] = 1;
        std::memcpy(out, m_data.data() + found->second * m_record, m_record);
        return true;
    }

    void put(uint64_t row, const uint8_t* record) {
        if (m_where.count(row)) return;
        while (m_used[m_hand]) {  // a second chance for every slot used since the hand last passed
            m_used[m_hand] = 0;
            m_hand = (m_hand + 1) % m_slots;
        }
        if (m_row_of[m_hand] != kEmpty) m_where.erase(m_row_of[m_hand]);
        m_row_of[m_hand] = row;
        m_where[row] = m_hand;
        std::memcpy(m_data.data() + m_hand * m_record, record, m_record);
        m_hand = (m_hand + 1) % m_slots;
    }

private:
    static constexpr uint64_t kEmpty = ~uint64_t{0};
    size_t m_slots, m_record;
    std::vector<uint8_t> m_data;
    std::vector<uint64_t> m_row_of;
    std::vector<uint8_t> m_used;
    std::unordered_map<uint64_t, size_t> m_where;
    size_t m_hand = 0;
};

constexpr size_t kCacheEntryOverhead = 64;  // the index's bytes per cached row, counted in the budget

std::mutex g_tiers_mutex;
std::map<int64_t, std::shared_ptr<Tier>> g_tiers;
int64_t g_next_tier = 1;

}  // namespace

struct Tier::Impl {
    int fds[3] = {-1, -1, -1};
    size_t zero_bytes = 0, record = 0;
    std::mutex cache_mutex;
    std::unique_ptr<RowCache> cache;
    std::atomic<uint64_t> stats[ENGRAM_STAT_COUNT] = {};
};

Tier::Tier(const EngramTierSpec& spec) : m_spec(spec), m_impl(std::make_unique<Impl>()) {
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
    if (!spec.read_ahead) ReadPool::with_threads(std::max<uint32_t>(1, spec.io_threads));
}

Tier::~Tier() {
    for (int fd : m_impl->fds)
        if (fd >= 0) close(fd);
}

void Tier::resolve(size_t count, const std::function<uint64_t(size_t)>& row, std::vector<RowRef>& refs,
                   std::vector<uint8_t>& scratch) {
    const EngramTierSpec& spec = m_spec;
    Impl& impl = *m_impl;
    refs.resize(count);
    impl.stats[ENGRAM_CALLS] += 1;
    impl.stats[ENGRAM_LOOKUPS] += count;

    // hot rows: bit r of the bitmap; their place is the number of set bits before r
    std::vector<std::pair<uint64_t, size_t>> missed;  // (row, lookup)
    uint64_t hot = 0;
    const uint64_t zeros_per_row = spec.zero_bits ? spec.zero_bits / spec.zero_value_bits : 0;
    for (size_t i = 0; i < count; ++i) {
        const uint64_t r = row(i);
        const uint64_t word = r >> 6, bit = r & 63;
        if (spec.hot_rows && (spec.hot_bits[word] >> bit & 1)) {
            uint64_t h = spec.hot_ranks[r >> 9];
            for (uint64_t w = (r >> 9) << 3; w < word; ++w) h += __builtin_popcountll(spec.hot_bits[w]);
            h += __builtin_popcountll(spec.hot_bits[word] & ((uint64_t{1} << bit) - 1));
            refs[i] = {spec.hot_parts[0] + h * spec.part_bytes[0], spec.hot_parts[1] + h * spec.part_bytes[1], 0,
                       spec.hot_parts[2], h * zeros_per_row};
            ++hot;
        } else {
            missed.emplace_back(r, i);
        }
    }
    impl.stats[ENGRAM_HOT_HITS] += hot;
    if (missed.empty()) return;

    std::sort(missed.begin(), missed.end());
    std::vector<uint64_t> unique;
    std::vector<size_t> slot(missed.size());
    for (size_t k = 0; k < missed.size(); ++k) {
        if (unique.empty() || unique.back() != missed[k].first) unique.push_back(missed[k].first);
        slot[k] = unique.size() - 1;
    }
    const size_t record = impl.record;
    scratch.assign(unique.size() * record, 0);
    std::vector<uint8_t> cached(unique.size(), 0);
    if (impl.cache->enabled()) {
        std::lock_guard<std::mutex> lock(impl.cache_mutex);
        for (size_t u = 0; u < unique.size(); ++u) cached[u] = impl.cache->get(unique[u], &scratch[u * record]);
    }
    uint64_t cache_hits = 0;
    for (size_t k = 0; k < missed.size(); ++k) cache_hits += cached[slot[k]];
    impl.stats[ENGRAM_CACHE_HITS] += cache_hits;

    // Each part of row r into its record; false where RWF_NOWAIT found a page not in the page cache.
    std::atomic<bool> failed{false};
    std::string error;
    std::mutex error_mutex;
    auto read_row = [&](size_t u, int flags) {
        const uint64_t r = unique[u];
        uint8_t* out = &scratch[u * record];
        const uint64_t zero_bit = r * spec.zero_bits;
        const struct {
            uint64_t offset, bytes;
            uint8_t* to;
        } parts[3] = {
            {spec.offsets[0] + r * spec.part_bytes[0], spec.part_bytes[0], out},
            {spec.offsets[1] + r * spec.part_bytes[1], spec.part_bytes[1], out + spec.part_bytes[0]},
            {spec.offsets[2] + zero_bit / 8, (zero_bit % 8 + spec.zero_bits + 7) / 8,
             out + spec.part_bytes[0] + spec.part_bytes[1]},
        };
        for (int p = 0; p < 3; ++p) {
            if (impl.fds[p] < 0) {
                if (spec.memory[p]) std::memcpy(parts[p].to, spec.memory[p] + parts[p].offset, parts[p].bytes);
                continue;
            }
            struct iovec span = {parts[p].to, parts[p].bytes};
            ssize_t got;
            do got = preadv2(impl.fds[p], &span, 1, static_cast<off_t>(parts[p].offset), flags);
            while (got < 0 && errno == EINTR);
            if (got == static_cast<ssize_t>(parts[p].bytes)) continue;
            if (flags) return false;  // not all in the page cache (or not supported): read it on the pool
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!failed.exchange(true))
                error = "reading row " + std::to_string(r) + " of the table file: " +
                        (got < 0 ? std::string(strerror(errno)) : "the file ends before it (truncated?)");
            return false;
        }
        return true;
    };
    std::vector<size_t> queued;
    uint64_t read = 0;
    for (size_t u = 0; u < unique.size(); ++u) {
        if (cached[u]) continue;
        ++read;
        if (!read_row(u, RWF_NOWAIT)) queued.push_back(u);
    }
    impl.stats[ENGRAM_PAGE_CACHE_ROWS] += read - queued.size();
    if (!queued.empty()) {
        const auto start = std::chrono::steady_clock::now();
        if (spec.read_ahead) {
            for (size_t u : queued) {  // every read in flight at once, then each waits for its own pages
                const uint64_t r = unique[u], zero_bit = r * spec.zero_bits;
                const uint64_t offsets[3] = {spec.offsets[0] + r * spec.part_bytes[0],
                                             spec.offsets[1] + r * spec.part_bytes[1], spec.offsets[2] + zero_bit / 8};
                const uint64_t lengths[3] = {spec.part_bytes[0], spec.part_bytes[1],
                                             (zero_bit % 8 + spec.zero_bits + 7) / 8};
                for (int p = 0; p < 3; ++p)
                    if (impl.fds[p] >= 0)
                        posix_fadvise(impl.fds[p], static_cast<off_t>(offsets[p]), static_cast<off_t>(lengths[p]),
                                      POSIX_FADV_WILLNEED);
            }
            for (size_t u : queued) read_row(u, 0);
        } else {
            ReadPool::with_threads(0).run(queued.size(), std::max<uint32_t>(1, spec.io_threads),
                                          [&](size_t k) { read_row(queued[k], 0); });
        }
        impl.stats[ENGRAM_READ_NS] += static_cast<uint64_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count());
        impl.stats[ENGRAM_QUEUED_ROWS] += queued.size();
    }
    if (failed) throw std::runtime_error(error);
    impl.stats[ENGRAM_ROWS_READ] += read;
    impl.stats[ENGRAM_BYTES_READ] += read * (spec.part_bytes[0] + spec.part_bytes[1] + (spec.zero_bits + 7) / 8);
    if (impl.cache->enabled() && read) {
        std::lock_guard<std::mutex> lock(impl.cache_mutex);
        for (size_t u = 0; u < unique.size(); ++u)
            if (!cached[u]) impl.cache->put(unique[u], &scratch[u * record]);
    }
    for (size_t k = 0; k < missed.size(); ++k) {
        const uint64_t r = missed[k].first;
        const uint8_t* out = &scratch[slot[k] * record];
        refs[missed[k].second] = {out, out + spec.part_bytes[0], 0, out + spec.part_bytes[0] + spec.part_bytes[1],
                                  spec.zero_bits ? (r * spec.zero_bits % 8) / spec.zero_value_bits : 0};
    }
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
}
