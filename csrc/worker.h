// MapWorker: one background thread that executes batches of page operations in submission order.
//
// The engine submits the mapping the next step needs, then runs the model while this thread talks
// to the driver; the next step waits on the ticket. Batches run strictly in FIFO order, so a
// synchronous request (submit + wait) also sees every earlier batch applied. If an operation
// fails, the rest of its batch is skipped and the error is re-thrown by the first wait() on that
// ticket or a later one.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "memory.h"

namespace vattn {

struct Op {
  enum class Kind { Create, Map, Unmap, Release };
  static constexpr int kKinds = 4;
  // Why the policy asked for the operation (growth, alias, reclaim, ...): a small tag the caller
  // names; the worker only counts time per (kind, cause).
  static constexpr int kCauses = 9;
  Kind kind = Kind::Create;
  std::shared_ptr<Reservation> reservation;  // Map, Unmap
  std::int64_t first = 0;                    // Map, Unmap: first page slot
  std::int64_t count = 0;                    // Unmap: number of page slots
  std::vector<PageId> page_ids;              // Create, Map, Release
  std::uint8_t cause = 0;                    // < kCauses
};

// Work done for one (kind, cause): operations, pages (page slots for Unmap), seconds.
struct OpTotals {
  std::uint64_t ops = 0;
  std::uint64_t pages = 0;
  double seconds = 0.0;
};

struct WorkerStats {
  std::uint64_t batches = 0;
  std::uint64_t map_runs = 0;
  std::uint64_t pages_mapped = 0;
  std::uint64_t pages_unmapped = 0;
  std::uint64_t pages_created = 0;
  std::uint64_t pages_released = 0;
  double busy_seconds = 0.0;  // time spent executing operations
  OpTotals by_op[Op::kKinds][Op::kCauses];  // the same time, by operation kind and cause
};

// Executes one operation on the calling thread.
void execute(PagePool& pool, const Op& op);

class MapWorker {
 public:
  explicit MapWorker(std::shared_ptr<PagePool> pool);
  MapWorker(const MapWorker&) = delete;
  MapWorker& operator=(const MapWorker&) = delete;
  // Finishes the queued batches, then joins the thread.
  ~MapWorker();

  // Queues a batch; returns its ticket (increasing from 1).
  std::uint64_t submit(std::vector<Op> ops);
  // Blocks until the batch has run; re-throws the error of the earliest batch up to it that
  // failed and was not yet reported (each error once): the batches before it ran first.
  void wait(std::uint64_t ticket);
  bool done(std::uint64_t ticket) const;
  // Waits at most `seconds` for the batch; whether it has run (its error, if any, stays for wait).
  bool wait_for(std::uint64_t ticket, double seconds) const;
  WorkerStats stats() const;
  // Seconds each map run took (map + set access) since the last drain, oldest first.
  std::vector<double> drain_map_latencies();

 private:
  void run();

  std::shared_ptr<PagePool> pool_;
  mutable std::mutex mutex_;
  std::condition_variable work_ready_;
  mutable std::condition_variable work_done_;
  std::deque<std::pair<std::uint64_t, std::vector<Op>>> queue_;
  std::map<std::uint64_t, std::exception_ptr> errors_;
  std::uint64_t submitted_ = 0;
  std::uint64_t completed_ = 0;
  bool stopping_ = false;
  WorkerStats stats_;
  std::vector<double> map_latencies_;
  std::thread thread_;  // last: starts after every member above exists
};

}  // namespace vattn
