#include "worker.h"

#include <chrono>
#include <stdexcept>
#include <string>

namespace vattn {
namespace {

// Bounds the latency log between drains (the metrics scraper drains it every few seconds).
constexpr std::size_t kMaxLatencies = 1 << 16;

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

void execute(PagePool& pool, const Op& op) {
  switch (op.kind) {
    case Op::Kind::Create:
      pool.create(op.page_ids);
      break;
    case Op::Kind::Map:
      op.reservation->map_run(op.first, op.page_ids);
      break;
    case Op::Kind::Unmap:
      op.reservation->unmap_run(op.first, op.count);
      break;
    case Op::Kind::Release:
      pool.release(op.page_ids);
      break;
  }
}

MapWorker::MapWorker(std::shared_ptr<PagePool> pool)
    : pool_(std::move(pool)), thread_([this] { run(); }) {}

MapWorker::~MapWorker() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  work_ready_.notify_all();
  thread_.join();
}

std::uint64_t MapWorker::submit(std::vector<Op> ops) {
  std::uint64_t ticket;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ticket = ++submitted_;
    queue_.emplace_back(ticket, std::move(ops));
  }
  work_ready_.notify_one();
  return ticket;
}

void MapWorker::wait(std::uint64_t ticket) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (ticket > submitted_) {
    throw std::invalid_argument("ticket " + std::to_string(ticket) + " was never issued (last " +
                                std::to_string(submitted_) + ")");
  }
  work_done_.wait(lock, [&] { return completed_ >= ticket; });
  // The earliest error not yet reported of a batch up to `ticket`: a caller waiting for a batch
  // relies on every batch before it (FIFO), so a failed earlier batch is its failure too.
  auto it = errors_.begin();
  if (it != errors_.end() && it->first <= ticket) {
    std::exception_ptr error = it->second;
    errors_.erase(it);
    std::rethrow_exception(error);
  }
}

bool MapWorker::done(std::uint64_t ticket) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return completed_ >= ticket;
}

bool MapWorker::wait_for(std::uint64_t ticket, double seconds) const {
  std::unique_lock<std::mutex> lock(mutex_);
  if (ticket > submitted_) {
    throw std::invalid_argument("ticket " + std::to_string(ticket) + " was never issued (last " +
                                std::to_string(submitted_) + ")");
  }
  return work_done_.wait_for(lock, std::chrono::duration<double>(seconds),
                             [&] { return completed_ >= ticket; });
}

WorkerStats MapWorker::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

std::vector<double> MapWorker::drain_map_latencies() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<double> out;
  out.swap(map_latencies_);
  return out;
}

void MapWorker::run() {
  for (;;) {
    std::pair<std::uint64_t, std::vector<Op>> batch;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      work_ready_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and every batch has run
      batch = std::move(queue_.front());
      queue_.pop_front();
    }
    WorkerStats delta;
    std::vector<double> latencies;
    std::exception_ptr error;
    const auto batch_start = std::chrono::steady_clock::now();
    for (const Op& op : batch.second) {
      const auto op_start = std::chrono::steady_clock::now();
      try {
        execute(*pool_, op);
      } catch (...) {
        error = std::current_exception();
        break;  // later operations of the batch may depend on this one
      }
      const double elapsed = seconds_since(op_start);
      const auto pages = static_cast<std::uint64_t>(op.page_ids.size());
      OpTotals& totals = delta.by_op[static_cast<int>(op.kind)][op.cause % Op::kCauses];
      totals.ops += 1;
      totals.pages += op.kind == Op::Kind::Unmap ? static_cast<std::uint64_t>(op.count) : pages;
      totals.seconds += elapsed;
      switch (op.kind) {
        case Op::Kind::Create: delta.pages_created += pages; break;
        case Op::Kind::Map:
          delta.map_runs += 1;
          delta.pages_mapped += pages;
          latencies.push_back(elapsed);
          break;
        case Op::Kind::Unmap: delta.pages_unmapped += static_cast<std::uint64_t>(op.count); break;
        case Op::Kind::Release: delta.pages_released += pages; break;
      }
    }
    const double busy = seconds_since(batch_start);
    // Drop the operations (and their references to reservations) outside the lock.
    batch.second.clear();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stats_.batches += 1;
      stats_.map_runs += delta.map_runs;
      stats_.pages_mapped += delta.pages_mapped;
      stats_.pages_unmapped += delta.pages_unmapped;
      stats_.pages_created += delta.pages_created;
      stats_.pages_released += delta.pages_released;
      stats_.busy_seconds += busy;
      for (int kind = 0; kind < Op::kKinds; ++kind) {
        for (int cause = 0; cause < Op::kCauses; ++cause) {
          OpTotals& into = stats_.by_op[kind][cause];
          const OpTotals& from = delta.by_op[kind][cause];
          into.ops += from.ops;
          into.pages += from.pages;
          into.seconds += from.seconds;
        }
      }
      for (double latency : latencies) {
        if (map_latencies_.size() < kMaxLatencies) map_latencies_.push_back(latency);
      }
      if (error) errors_[batch.first] = error;
      completed_ = batch.first;
    }
    work_done_.notify_all();
  }
}

}  // namespace vattn
