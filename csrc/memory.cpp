#include "memory.h"

#include <stdexcept>
#include <string>

#include "errors.h"

namespace vattn {

void PagePool::create(const std::vector<PageId>& ids) {
  for (PageId id : ids) {
    if (id < 0) throw std::invalid_argument("page id " + std::to_string(id) + " is negative");
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (pages_.count(id)) {
        throw std::invalid_argument("page id " + std::to_string(id) + " already exists");
      }
    }
    // The driver call runs unlocked: it is slow and touches no state of ours.
    PhysicalPage page(backend_);
    std::lock_guard<std::mutex> lock(mutex_);
    pages_.emplace(id, Entry{std::move(page), 0});
  }
}

void PagePool::release(const std::vector<PageId>& ids) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (PageId id : ids) {
    auto it = pages_.find(id);
    if (it == pages_.end()) {
      throw std::invalid_argument("release of unknown page id " + std::to_string(id));
    }
    if (it->second.mappings > 0) {
      throw std::invalid_argument("release of page id " + std::to_string(id) +
                                  " while it is mapped (" + std::to_string(it->second.mappings) +
                                  " mappings)");
    }
  }
  for (PageId id : ids) pages_.erase(id);
}

std::size_t PagePool::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return pages_.size();
}

bool PagePool::contains(PageId id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return pages_.count(id) != 0;
}

bool PagePool::is_mapped(PageId id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = pages_.find(id);
  return it != pages_.end() && it->second.mappings > 0;
}

std::int64_t PagePool::mappings(PageId id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = pages_.find(id);
  return it == pages_.end() ? 0 : it->second.mappings;
}

PageHandle PagePool::claim_for_mapping(PageId id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = pages_.find(id);
  if (it == pages_.end()) {
    throw std::invalid_argument("map of unknown page id " + std::to_string(id));
  }
  ++it->second.mappings;  // another mapping of a mapped page is an alias
  return it->second.page.handle();
}

void PagePool::mark_unmapped(PageId id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = pages_.find(id);
  if (it != pages_.end() && it->second.mappings > 0) --it->second.mappings;
}

Reservation::Reservation(std::shared_ptr<PagePool> pool, std::size_t num_pages)
    : pool_(std::move(pool)),
      page_size_(pool_->backend().page_size()),
      base_(0),
      page_ids_(num_pages, -1) {
  if (num_pages == 0) throw std::invalid_argument("a reservation needs at least one page");
  base_ = pool_->backend().reserve(num_pages * page_size_);
}

Reservation::~Reservation() {
  try {
    unmap_slots(0, static_cast<std::int64_t>(page_ids_.size()));
    pool_->backend().free_reservation(base_, bytes());
  } catch (...) {
    // NOTE: destructors never throw; a failed unmap here leaves the range to the process's end.
  }
}

void Reservation::check_range(std::int64_t first, std::int64_t count) const {
  const auto total = static_cast<std::int64_t>(page_ids_.size());
  if (first < 0 || count < 0 || first + count > total) {
    throw std::out_of_range("page slots [" + std::to_string(first) + ", " +
                            std::to_string(first + count) + ") outside a reservation of " +
                            std::to_string(total) + " pages");
  }
}

void Reservation::map_run(std::int64_t first, const std::vector<PageId>& ids) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto count = static_cast<std::int64_t>(ids.size());
  check_range(first, count);
  for (std::int64_t i = 0; i < count; ++i) {
    if (page_ids_[first + i] != -1) {
      throw std::invalid_argument("page slot " + std::to_string(first + i) +
                                  " already holds page id " +
                                  std::to_string(page_ids_[first + i]));
    }
  }
  std::int64_t mapped = 0;
  try {
    for (; mapped < count; ++mapped) {
      const PageHandle handle = pool_->claim_for_mapping(ids[mapped]);
      try {
        pool_->backend().map(base_ + (first + mapped) * page_size_, handle);
      } catch (...) {
        pool_->mark_unmapped(ids[mapped]);
        throw;
      }
      page_ids_[first + mapped] = ids[mapped];
    }
    if (count > 0) pool_->backend().set_access(base_ + first * page_size_, count * page_size_);
  } catch (...) {
    // All or nothing: roll back the part of the run that was mapped.
    try {
      unmap_slots(first, mapped);
    } catch (...) {
    }
    throw;
  }
}

void Reservation::unmap_run(std::int64_t first, std::int64_t count) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_range(first, count);
  for (std::int64_t i = first; i < first + count; ++i) {
    if (page_ids_[i] == -1) {
      throw std::invalid_argument("unmap of page slot " + std::to_string(i) +
                                  ", which holds no page");
    }
  }
  unmap_slots(first, count);
}

void Reservation::unmap_slots(std::int64_t first, std::int64_t count) {
  // Unmaps each maximal run of mapped slots in one call; unmapped slots are skipped.
  std::int64_t i = first;
  while (i < first + count) {
    if (page_ids_[i] == -1) {
      ++i;
      continue;
    }
    std::int64_t end = i;
    while (end < first + count && page_ids_[end] != -1) ++end;
    pool_->backend().unmap(base_ + i * page_size_, (end - i) * page_size_);
    for (std::int64_t j = i; j < end; ++j) {
      pool_->mark_unmapped(page_ids_[j]);
      page_ids_[j] = -1;
    }
    i = end;
  }
}

std::vector<PageId> Reservation::page_ids() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return page_ids_;
}

}  // namespace vattn
