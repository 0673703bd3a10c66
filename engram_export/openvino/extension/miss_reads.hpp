// How table_tier.cpp puts all of a call's misses in flight at once, besides the readahead hint (see
// table_tier.hpp): a pool of threads that wait on reads, or an io_uring of the calling thread.

#pragma once

#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace engram {

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

// An io_uring of the calling thread, over the kernel's own interface (liburing is not on every host):
// reads submitted as one batch, waited for together. The ring's indices are shared with the kernel: our
// stores to the tails and heads release what we wrote before them, our loads of the kernel's acquire
// (as liburing's barrier.h does).
class Ring {
public:
    struct Span {
        int fd;
        uint64_t offset;
        uint32_t bytes;
        uint8_t* to;
    };

    // The thread's ring, made (again) when it has none, is too small for `spans` reads at once (up to
    // kMost) or was inherited through fork (the child must not share its parent's ring).
    static Ring& of_thread(size_t spans) {
        thread_local std::unique_ptr<Ring> ring;
        const unsigned want = std::min<size_t>(kMost, std::max<size_t>(8, spans));
        if (!ring || ring->m_pid != getpid() || (ring->m_entries < want && ring->m_entries < kMost)) {
            ring.reset();
            ring.reset(new Ring(want));
        }
        return *ring;
    }

    // Why this process cannot read through io_uring ("" if it can): no io_uring (a seccomp filter, the
    // io_uring_disabled sysctl) or no IORING_OP_READ (Linux < 5.6).
    static std::string unavailable() {
        try {
            Ring ring(2);
            std::vector<uint8_t> memory(sizeof(io_uring_probe) + 256 * sizeof(io_uring_probe_op), 0);
            auto* probe = reinterpret_cast<io_uring_probe*>(memory.data());
            if (syscall(__NR_io_uring_register, ring.m_fd, IORING_REGISTER_PROBE, probe, 256) < 0)
                return std::string("io_uring_register: ") + strerror(errno);
            if (probe->ops_len <= IORING_OP_READ || !(probe->ops[IORING_OP_READ].flags & IO_URING_OP_SUPPORTED))
                return "the kernel's io_uring has no IORING_OP_READ (Linux 5.6)";
            return "";
        } catch (const std::exception& exc) {
            return exc.what();
        }
    }

    ~Ring() { release(); }

    // Every span read, as many in flight at once as the ring holds; full[i]: span i was read whole (else
    // the caller reads it again the plain way, which says why it failed).
    void read(const std::vector<Span>& spans, std::vector<uint8_t>& full) {
        full.assign(spans.size(), 0);
        size_t next = 0, in_flight = 0;
        unsigned unsubmitted = 0;
        while (next < spans.size() || in_flight) {
            unsigned tail = *m_sq_tail;
            const unsigned head = __atomic_load_n(m_sq_head, __ATOMIC_ACQUIRE);
            for (; next < spans.size() && in_flight < m_entries && tail - head < m_entries; ++next, ++tail) {
                const unsigned at = tail & m_sq_mask;
                io_uring_sqe& sqe = m_sqes[at];
                std::memset(&sqe, 0, sizeof sqe);
                sqe.opcode = IORING_OP_READ;
                sqe.fd = spans[next].fd;
                sqe.off = spans[next].offset;
                sqe.addr = reinterpret_cast<uint64_t>(spans[next].to);
                sqe.len = spans[next].bytes;
                sqe.user_data = next;
                m_sq_array[at] = at;
                ++in_flight, ++unsubmitted;
            }
            __atomic_store_n(m_sq_tail, tail, __ATOMIC_RELEASE);
            const unsigned wait = next < spans.size() ? 1 : static_cast<unsigned>(in_flight);  // all sent: all back
            const long sent = syscall(__NR_io_uring_enter, m_fd, unsubmitted, wait, IORING_ENTER_GETEVENTS, nullptr, 0);
            if (sent < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY)
                throw std::runtime_error(std::string("io_uring_enter: ") + strerror(errno));
            if (sent > 0) unsubmitted -= static_cast<unsigned>(sent);
            unsigned done = *m_cq_head;
            for (const unsigned end = __atomic_load_n(m_cq_tail, __ATOMIC_ACQUIRE); done != end; ++done, --in_flight) {
                const io_uring_cqe& cqe = m_cqes[done & m_cq_mask];
                full[cqe.user_data] = cqe.res >= 0 && static_cast<uint32_t>(cqe.res) == spans[cqe.user_data].bytes;
            }
            __atomic_store_n(m_cq_head, done, __ATOMIC_RELEASE);
        }
    }

private:
    static constexpr size_t kMost = 1024;  // reads in flight at once: deeper than a disk's queue

    explicit Ring(unsigned entries) : m_pid(getpid()) {
        io_uring_params params{};
        m_fd = static_cast<int>(syscall(__NR_io_uring_setup, entries, &params));
        if (m_fd < 0) throw std::runtime_error(std::string("io_uring_setup: ") + strerror(errno));
        try {
            map_rings(params);
        } catch (...) {
            release();
            throw;
        }
    }

    void map_rings(const io_uring_params& params) {
        m_entries = params.sq_entries;
        size_t sq_bytes = params.sq_off.array + params.sq_entries * sizeof(unsigned);
        size_t cq_bytes = params.cq_off.cqes + params.cq_entries * sizeof(io_uring_cqe);
        const bool single = params.features & IORING_FEAT_SINGLE_MMAP;
        if (single) sq_bytes = cq_bytes = std::max(sq_bytes, cq_bytes);
        auto* sq = static_cast<uint8_t*>(map(sq_bytes, IORING_OFF_SQ_RING));
        auto* cq = single ? sq : static_cast<uint8_t*>(map(cq_bytes, IORING_OFF_CQ_RING));
        m_sqes = static_cast<io_uring_sqe*>(map(params.sq_entries * sizeof(io_uring_sqe), IORING_OFF_SQES));
        m_sq_head = reinterpret_cast<unsigned*>(sq + params.sq_off.head);
        m_sq_tail = reinterpret_cast<unsigned*>(sq + params.sq_off.tail);
        m_sq_mask = *reinterpret_cast<unsigned*>(sq + params.sq_off.ring_mask);
        m_sq_array = reinterpret_cast<unsigned*>(sq + params.sq_off.array);
        m_cq_head = reinterpret_cast<unsigned*>(cq + params.cq_off.head);
        m_cq_tail = reinterpret_cast<unsigned*>(cq + params.cq_off.tail);
        m_cq_mask = *reinterpret_cast<unsigned*>(cq + params.cq_off.ring_mask);
        m_cqes = reinterpret_cast<io_uring_cqe*>(cq + params.cq_off.cqes);
    }

    void release() {
        for (auto [at, bytes] : m_maps)
            if (at != MAP_FAILED) munmap(at, bytes);
        close(m_fd);
    }

    void* map(size_t bytes, off_t what) {
        void* at = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, m_fd, what);
        m_maps.emplace_back(at, bytes);
        if (at == MAP_FAILED) throw std::runtime_error(std::string("mapping an io_uring: ") + strerror(errno));
        return at;
    }

    pid_t m_pid;
    int m_fd = -1;
    unsigned m_entries = 0, m_sq_mask = 0, m_cq_mask = 0;
    unsigned *m_sq_head = nullptr, *m_sq_tail = nullptr, *m_sq_array = nullptr;
    unsigned *m_cq_head = nullptr, *m_cq_tail = nullptr;
    io_uring_sqe* m_sqes = nullptr;
    io_uring_cqe* m_cqes = nullptr;
    std::vector<std::pair<void*, size_t>> m_maps;
};

}  // namespace engram
