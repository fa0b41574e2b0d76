// The Python module replica._vmm: every pybind11 binding of the VMM mechanism lives here.
// Calls that reach the driver or the OS release the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "backend.h"
#include "errors.h"
#include "memory.h"
#include "worker.h"

namespace py = pybind11;
using namespace vattn;

PYBIND11_MODULE(_vmm, m) {
  m.doc() = "vAttention VMM mechanism: backends, physical pages, reservations, mapping worker";
  py::register_exception<VmmError>(m, "VmmError", PyExc_RuntimeError);

  py::class_<Backend, std::shared_ptr<Backend>>(m, "Backend")
      .def_property_readonly("name", &Backend::name)
      .def_property_readonly("page_size", &Backend::page_size);

  m.def("host_backend", &make_host_backend, py::arg("page_size"),
        "memfd + mmap backend on CPU memory with pages of `page_size` bytes");
  m.def("cuda_backend", &make_cuda_backend, py::arg("device"), py::arg("page_size") = 0,
        "CUDA driver backend; page_size 0 means the device's granularity",
        py::call_guard<py::gil_scoped_release>());
  m.def("cuda_granularity", &cuda_granularity, py::arg("device"));
  m.def("cuda_available", [] {
    std::string why;
    const bool ok = cuda_available(&why);
    return py::make_tuple(ok, why);
  });

  py::class_<PagePool, std::shared_ptr<PagePool>>(m, "PagePool")
      .def(py::init<std::shared_ptr<Backend>>(), py::arg("backend"))
      .def_property_readonly("backend", &PagePool::backend_ptr)
      .def("create", &PagePool::create, py::arg("ids"), py::call_guard<py::gil_scoped_release>())
      .def("release", &PagePool::release, py::arg("ids"),
           py::call_guard<py::gil_scoped_release>())
      .def("__len__", &PagePool::size)
      .def("__contains__", &PagePool::contains)
      .def("is_mapped", &PagePool::is_mapped, py::arg("id"))
      .def("mappings", &PagePool::mappings, py::arg("id"));

  py::class_<Reservation, std::shared_ptr<Reservation>>(m, "Reservation", py::buffer_protocol())
      .def(py::init<std::shared_ptr<PagePool>, std::size_t>(), py::arg("pool"),
           py::arg("num_pages"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("base", &Reservation::base)
      .def_property_readonly("num_pages", &Reservation::num_pages)
      .def_property_readonly("nbytes", &Reservation::bytes)
      .def_property_readonly("page_size", &Reservation::page_size)
      .def("map_run", &Reservation::map_run, py::arg("first"), py::arg("ids"),
           py::call_guard<py::gil_scoped_release>())
      .def("unmap_run", &Reservation::unmap_run, py::arg("first"), py::arg("count"),
           py::call_guard<py::gil_scoped_release>())
      .def("page_ids", &Reservation::page_ids)
      // CPU memory only: a buffer over device memory would let Python dereference GPU addresses.
      .def_buffer([](Reservation& self) -> py::buffer_info {
        if (!self.host_memory()) {
          throw std::invalid_argument("only host-backend reservations expose a CPU buffer");
        }
        return py::buffer_info(reinterpret_cast<void*>(self.base()), 1,
                               py::format_descriptor<std::uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(self.bytes())}, {1});
      });

  // `cause` tags an operation with why the policy asked for it (the worker's time breakdown).
  auto checked_cause = [](int cause) {
    if (cause < 0 || cause >= Op::kCauses) {
      throw std::invalid_argument("op cause " + std::to_string(cause) + " outside [0, " +
                                  std::to_string(Op::kCauses) + ")");
    }
    return static_cast<std::uint8_t>(cause);
  };
  py::class_<Op> op(m, "Op");
  op.def_static(
        "create",
        [=](std::vector<PageId> ids, int cause) {
          return Op{Op::Kind::Create, nullptr, 0, 0, std::move(ids), checked_cause(cause)};
        },
        py::arg("ids"), py::arg("cause") = 0)
      .def_static(
          "map",
          [=](std::shared_ptr<Reservation> r, std::int64_t first, std::vector<PageId> ids,
              int cause) {
            return Op{Op::Kind::Map, std::move(r), first, 0, std::move(ids), checked_cause(cause)};
          },
          py::arg("reservation"), py::arg("first"), py::arg("ids"), py::arg("cause") = 0)
      .def_static(
          "unmap",
          [=](std::shared_ptr<Reservation> r, std::int64_t first, std::int64_t count, int cause) {
            return Op{Op::Kind::Unmap, std::move(r), first, count, {}, checked_cause(cause)};
          },
          py::arg("reservation"), py::arg("first"), py::arg("count"), py::arg("cause") = 0)
      .def_static(
          "release",
          [=](std::vector<PageId> ids, int cause) {
            return Op{Op::Kind::Release, nullptr, 0, 0, std::move(ids), checked_cause(cause)};
          },
          py::arg("ids"), py::arg("cause") = 0)
      .def_property_readonly("cause", [](const Op& self) { return static_cast<int>(self.cause); })
      .def("__repr__", [](const Op& self) {
        static const char* names[] = {"create", "map", "unmap", "release"};
        return std::string("Op.") + names[static_cast<int>(self.kind)] + "(first=" +
               std::to_string(self.first) + ", count=" + std::to_string(self.count) +
               ", pages=" + std::to_string(self.page_ids.size()) +
               ", cause=" + std::to_string(self.cause) + ")";
      });

  m.def(
      "execute",
      [](std::shared_ptr<PagePool> pool, const std::vector<Op>& ops) {
        for (const Op& one : ops) execute(*pool, one);
      },
      py::arg("pool"), py::arg("ops"), py::call_guard<py::gil_scoped_release>(),
      "Runs operations on the calling thread, in order");

  py::class_<MapWorker, std::shared_ptr<MapWorker>>(m, "MapWorker")
      .def(py::init<std::shared_ptr<PagePool>>(), py::arg("pool"))
      .def("submit", &MapWorker::submit, py::arg("ops"))
      .def("wait", &MapWorker::wait, py::arg("ticket"), py::call_guard<py::gil_scoped_release>())
      .def("done", &MapWorker::done, py::arg("ticket"))
      .def("wait_for", &MapWorker::wait_for, py::arg("ticket"), py::arg("seconds"),
           py::call_guard<py::gil_scoped_release>())
      .def("drain_map_latencies", &MapWorker::drain_map_latencies)
      .def("stats", [](const MapWorker& self) {
        const WorkerStats s = self.stats();
        py::dict d;
        d["batches"] = s.batches;
        d["map_runs"] = s.map_runs;
        d["pages_mapped"] = s.pages_mapped;
        d["pages_unmapped"] = s.pages_unmapped;
        d["pages_created"] = s.pages_created;
        d["pages_released"] = s.pages_released;
        d["busy_seconds"] = s.busy_seconds;
        // (kind, cause) -> (ops, pages, seconds), the pairs that ran at least once.
        static const char* kinds[] = {"create", "map", "unmap", "release"};
        py::dict by_op;
        for (int kind = 0; kind < Op::kKinds; ++kind) {
          for (int cause = 0; cause < Op::kCauses; ++cause) {
            const OpTotals& t = s.by_op[kind][cause];
            if (t.ops == 0) continue;
            by_op[py::make_tuple(kinds[kind], cause)] = py::make_tuple(t.ops, t.pages, t.seconds);
          }
        }
        d["by_op"] = by_op;
        return d;
      });
}
