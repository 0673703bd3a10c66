// Guarded file mappings (openvino/file_guard.py): a runtime that serves a file's pages must not die, nor
// answer silently from other bytes, when that file changes under it (an operator's `cp` over a live
// file, an rsync in place).
//
// - A read of a page that vanished (the file truncated under its mapping) raises SIGBUS, which kills
//   the process by default. Inside a guarded range this handler maps a zero page over the faulting page
//   and marks the range: the read completes, and the runtime refuses the call (and every later one)
//   after it, in one line naming the file. A fault outside every guarded range goes to the handler
//   that was there before, or kills the process as it would have.
// - A write to the file (write(2), truncate) raises an inotify IN_MODIFY event on its inode: the
//   state of a range drains the events queued so far, so the call that checks it after running sees
//   every write that completed before it (a file renamed over the old one writes nothing to the old
//   inode, which the mapping keeps alive: the safe way to deploy new files).
//
// Slots are read by the handler without a lock (atomics); adding and removing take a mutex.

#include <fcntl.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>

namespace {

constexpr int kSlots = 4096;
constexpr int kFaulted = 1, kWritten = 2;  // a slot's state bits

struct Slot {
    std::atomic<uintptr_t> start{0}, end{0};  // end 0: the slot is free
    std::atomic<int> state{0};
    int watch = -1;  // the inotify watch of its file (shared by every slot of the same inode)
};

Slot slots[kSlots];
std::mutex slots_mutex;     // adding and removing slots, draining the inotify queue
std::atomic<int> inotify_fd{-1};
uintptr_t page_size = 4096;
struct sigaction previous_action;
std::once_flag installed;

// A fault outside every guarded range goes on to the handler that was there before ours; a signal sent
// by another process (si_code <= 0) takes the default action.
void pass_on(int signal_number, siginfo_t* info, void* context) {
    if (info->si_code > 0 && (previous_action.sa_flags & SA_SIGINFO)) {
        previous_action.sa_sigaction(signal_number, info, context);
        return;
    }
    if (info->si_code > 0 && previous_action.sa_handler != SIG_DFL && previous_action.sa_handler != SIG_IGN) {
        previous_action.sa_handler(signal_number);
        return;
    }
    // as without this handler: a fault's read, re-executed on return, now takes the default action
    // (the kernel does not let a fault be ignored); a signal sent by a process is raised again
    signal(signal_number, SIG_DFL);
    if (info->si_code <= 0) raise(signal_number);
}

void on_bus_error(int signal_number, siginfo_t* info, void* context) {
    if (info->si_code == SI_TKILL && info->si_pid == getpid()) {
        // a handler installed over ours passed a fault on (Python's faulthandler restores ours and
        // raises): return, the faulting read runs again and faults into ours, which now sees its address
        return;
    }
    const auto address = reinterpret_cast<uintptr_t>(info->si_addr);
    bool ours = false;
    if (info->si_code == BUS_ADRERR) {
        for (auto& slot : slots) {
            const uintptr_t end = slot.end.load(std::memory_order_acquire);
            if (end != 0 && slot.start.load(std::memory_order_acquire) <= address && address < end) {
                slot.state.fetch_or(kFaulted);
                ours = true;
            }
        }
    }
    if (ours) {  // mmap is a plain system call: safe here in practice, as in every JVM's handler
        void* page = reinterpret_cast<void*>(address & ~(page_size - 1));
        if (mmap(page, page_size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED) return;
    }
    pass_on(signal_number, info, context);
}

struct sigaction our_action() {
    struct sigaction action {};
    action.sa_sigaction = on_bus_error;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    return action;
}

// Ours back on top of SIGBUS whenever another handler was installed over it since (a library enabling
// Python's faulthandler after a guard was added). That handler is displaced, not chained: it would pass a
// fault back to us (faulthandler restores ours and raises), and round it would go. A fault outside every
// guarded range still goes to the handler that was there before ours was first installed. Checked when
// a guard is added and whenever a guard's state is read.
void keep_on_top() {
    struct sigaction now {};
    sigaction(SIGBUS, nullptr, &now);
    if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_bus_error) return;
    const struct sigaction action = our_action();
    sigaction(SIGBUS, &action, nullptr);
}

void install() {
    page_size = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    inotify_fd.store(inotify_init1(IN_NONBLOCK | IN_CLOEXEC));
    const struct sigaction action = our_action();
    sigaction(SIGBUS, &action, &previous_action);
}

// Marks every slot of a watch whose file was written since the last drain (all of them when the
// queue overflowed). Holds slots_mutex.
void drain_events() {
    const int fd = inotify_fd.load();
    if (fd < 0) return;
    alignas(inotify_event) char buffer[16384];
    for (;;) {
        const ssize_t got = read(fd, buffer, sizeof buffer);
        if (got <= 0) return;
        for (ssize_t at = 0; at < got;) {
            const auto* event = reinterpret_cast<const inotify_event*>(buffer + at);
            for (auto& slot : slots) {
                if (slot.end.load() != 0 && ((event->mask & IN_Q_OVERFLOW) || (slot.watch >= 0 && slot.watch == event->wd))) {
                    slot.state.fetch_or(kWritten);
                }
            }
            at += static_cast<ssize_t>(sizeof(inotify_event) + event->len);
        }
    }
}

}  // namespace

extern "C" {

// Guards [start, start + length), a mapping of `path` (null: a file no path names any more, whose
// pages alone are guarded); returns the slot, or -1 when every slot is taken, -2 when the file cannot
// be watched (errno says why).
int engram_guard_add(uintptr_t start, size_t length, const char* path) {
    std::call_once(installed, install);
    keep_on_top();
    std::lock_guard<std::mutex> lock(slots_mutex);
    const int fd = inotify_fd.load();
    const int watch = fd < 0 || path == nullptr ? -1 : inotify_add_watch(fd, path, IN_MODIFY);
    if (watch < 0 && path != nullptr) return -2;
    for (int index = 0; index < kSlots; ++index) {
        Slot& slot = slots[index];
        if (slot.end.load() != 0) continue;
        slot.state.store(0);
        slot.watch = watch;
        slot.start.store(start, std::memory_order_release);
        slot.end.store(start + length, std::memory_order_release);
        return index;
    }
    return -1;
}

// The first of `count` slots whose file changed since it was added, after draining the writes queued
// so far: its position in `indices`, its state in `*state` (bit 1: a page vanished, SIGBUS caught; bit
// 2: the file was written); -1 when none did.
int engram_guard_changed(const int* indices, size_t count, int* state) {
    keep_on_top();
    {
        std::lock_guard<std::mutex> lock(slots_mutex);
        drain_events();
    }
    for (size_t position = 0; position < count; ++position) {
        const int index = indices[position];
        const int found = index >= 0 && index < kSlots ? slots[index].state.load() : 0;
        if (found != 0) {
            *state = found;
            return static_cast<int>(position);
        }
    }
    return -1;
}

void engram_guard_remove(int index) {
    if (index < 0 || index >= kSlots) return;
    std::lock_guard<std::mutex> lock(slots_mutex);
    drain_events();  // events of this watch must not mark a slot that reuses it
    Slot& slot = slots[index];
    const int watch = slot.watch;
    slot.end.store(0, std::memory_order_release);
    slot.start.store(0, std::memory_order_release);
    slot.watch = -1;
    if (watch < 0) return;
    for (auto& other : slots) {
        if (other.end.load() != 0 && other.watch == watch) return;  // the file is still guarded elsewhere
    }
    inotify_rm_watch(inotify_fd.load(), watch);
}
}
