// Physical pages by integer id (PagePool) and virtual ranges that pages map into (Reservation).
//
// The policy of which id backs which part of which range lives in Python (replica/); these
// classes only execute it, and refuse what would break the mechanism's own invariants:
//   * a page id is mapped at most once, anywhere;
//   * a reserved page slot holds at most one page;
//   * a page is released only when unmapped.
// A map run either maps all its pages (and grants access once) or none.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "backend.h"

namespace vattn {

using PageId = std::int64_t;

class PagePool {
 public:
  explicit PagePool(std::shared_ptr<Backend> backend) : backend_(std::move(backend)) {}
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  Backend& backend() { return *backend_; }
  const std::shared_ptr<Backend>& backend_ptr() const { return backend_; }

  // Creates a physical page for each new id (ids are chosen by the caller's policy).
  void create(const std::vector<PageId>& ids);
  // Releases unmapped pages back to the device.
  void release(const std::vector<PageId>& ids);
  std::size_t size() const;
  bool contains(PageId id) const;
  bool is_mapped(PageId id) const;
  // How many page slots map the page now (0 for an unknown id).
  std::int64_t mappings(PageId id) const;

  // Used by Reservation: look a page up and count one more (one fewer) mapping of it.
  PageHandle claim_for_mapping(PageId id);
  void mark_unmapped(PageId id);

 private:
  struct Entry {
    PhysicalPage page;
    std::int64_t mappings = 0;
  };
  std::shared_ptr<Backend> backend_;
  mutable std::mutex mutex_;
  std::unordered_map<PageId, Entry> pages_;
};

// Owns one reserved virtual range of `num_pages` page slots. Unmaps what is still mapped and frees
// the range on destruction. Tensors over the range must keep this object alive.
class Reservation {
 public:
  Reservation(std::shared_ptr<PagePool> pool, std::size_t num_pages);
  Reservation(const Reservation&) = delete;
  Reservation& operator=(const Reservation&) = delete;
  ~Reservation();

  std::uintptr_t base() const { return base_; }
  std::size_t num_pages() const { return page_ids_.size(); }
  std::size_t bytes() const { return page_ids_.size() * page_size_; }
  std::size_t page_size() const { return page_size_; }
  bool host_memory() const { return pool_->backend().name() == "host"; }

  // Maps ids[i] at page slot first + i, then grants access to the run once.
  void map_run(std::int64_t first, const std::vector<PageId>& ids);
  // Unmaps the page slots [first, first + count); each must be mapped.
  void unmap_run(std::int64_t first, std::int64_t count);
  // The page id at each slot, -1 where unmapped.
  std::vector<PageId> page_ids() const;

 private:
  void check_range(std::int64_t first, std::int64_t count) const;
  void unmap_slots(std::int64_t first, std::int64_t count);

  std::shared_ptr<PagePool> pool_;
  std::size_t page_size_;
  std::uintptr_t base_;
  mutable std::mutex mutex_;
  std::vector<PageId> page_ids_;
};

}  // namespace vattn
