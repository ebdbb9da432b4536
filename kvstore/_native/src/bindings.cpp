// The Python shim over the UCX-only core, and the only file that includes
// Python: GIL handling, buffer-protocol registration, completion callbacks
// and exception translation. kvstore/_native/__init__.py wraps this module
// (kvstore._native._ext) into the public API.
//
// GIL rules: every call that can wait on UCX or on another thread releases
// the GIL first. The progress thread never takes the GIL inside UCX (the
// core queues completions); it takes it once per round of completions, in
// the runner below. Python references owned by native objects are dropped
// through guards that take the GIL, from whatever thread drops them.

#include <nanobind/nanobind.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "context.h"
#include "copy.h"
#include "endpoint.h"
#include "memory_handle.h"
#include "remote_key.h"
#include "rma.h"
#include "status.h"
#include "worker.h"

namespace nb = nanobind;
namespace kn = kvstore::native;
using namespace nb::literals;

namespace {

// Whether this thread may take the GIL: never while the interpreter is being
// torn down, when a foreign thread that tries is terminated on the spot.
bool python_usable() noexcept {
  if (!nb::is_alive()) {
    return false;
  }
#if PY_VERSION_HEX >= 0x030D0000
  return !Py_IsFinalizing();
#else
  return !_Py_IsFinalizing();
#endif
}

// A strong reference to a Python object that native code may drop from any
// thread. At interpreter teardown the reference is leaked on purpose.
class PyRef {
 public:
  explicit PyRef(nb::handle object) : object_(object.inc_ref().ptr()) {}
  ~PyRef() {
    if (object_ != nullptr && python_usable()) {
      nb::gil_scoped_acquire gil;
      Py_DECREF(object_);
    }
  }
  PyRef(const PyRef&) = delete;
  PyRef& operator=(const PyRef&) = delete;
  nb::handle get() const noexcept { return object_; }

 private:
  PyObject* object_;
};

// The exporter's view of a registered buffer, released after the unmap.
struct BufferView {
  Py_buffer view{};
  bool held = false;
  ~BufferView() {
    if (held && python_usable()) {
      nb::gil_scoped_acquire gil;
      PyBuffer_Release(&view);
    }
  }
};

// kvstore.errors classes by family, registered by __init__.py; an owned
// reference that is never released.
nb::handle error_classes;

void raise_native(const kn::Error& error) {
  PyObject* cls = nullptr;
  if (error_classes.is_valid()) {
    nb::int_ family(static_cast<int>(error.family()));
    cls = PyDict_GetItem(error_classes.ptr(), family.ptr());  // borrowed
  }
  if (cls == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return;
  }
  try {
    nb::object exc = nb::handle(cls)(error.what(), "index"_a = error.index());
    exc.attr("status") = static_cast<int>(error.status());
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  } catch (nb::python_error& e) {
    e.restore();  // constructing the exception failed: raise that instead
  }
}

// Runs a round of completions on the thread that progresses the worker,
// holding the GIL once for all of them, and destroys them (and the Python
// references they hold) before letting it go.
void run_with_gil(std::vector<kn::Worker::Task>& tasks) {
  if (!python_usable()) {
    // Interpreter teardown: running or destroying the tasks would need the
    // GIL. Leak them; the process is exiting.
    new std::vector<kn::Worker::Task>(std::move(tasks));
    tasks.clear();
    return;
  }
  nb::gil_scoped_acquire gil;
  for (auto& task : tasks) {
    try {
      task();
    } catch (nb::python_error& e) {
      e.discard_as_unraisable("kvstore._native completion");
    } catch (const std::exception& e) {
      std::fprintf(stderr, "kvstore._native: a completion failed: %s\n", e.what());
    }
  }
  tasks.clear();
}

// Wraps a Python callable as the batch completion: called as
// callback(status: int, message: str) with the GIL held (run_with_gil).
kn::Completion python_completion(nb::callable callback) {
  auto ref = std::make_shared<PyRef>(callback);
  return [ref](ucs_status_t status, const std::string& message) {
    try {
      ref->get()(static_cast<int>(status), message);
    } catch (nb::python_error& e) {
      // An exception escaping a completion callback has nobody to go to.
      e.discard_as_unraisable(ref->get());
    }
  };
}

std::shared_ptr<kn::MemoryHandle> register_buffer(const std::shared_ptr<kn::Context>& context,
                                                  nb::handle buffer) {
  auto view = std::make_shared<BufferView>();
  // WRITABLE: gets write into the memory. ANY_CONTIGUOUS: one range.
  if (PyObject_GetBuffer(buffer.ptr(), &view->view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS) != 0) {
    nb::python_error error;  // fetches and clears the Python error
    throw kn::InvalidArgumentError(
        std::string("cannot register a ") + Py_TYPE(buffer.ptr())->tp_name +
        ": it must be a writable, contiguous buffer (" + error.what() + ")");
  }
  view->held = true;
  void* address = view->view.buf;
  const auto length = static_cast<std::size_t>(view->view.len);
  nb::gil_scoped_release release;
  return kn::MemoryHandle::map(context, address, length, std::move(view));
}

// Endpoint.get and Endpoint.put: one posting path, bound once per direction.
template <kn::Direction direction>
void post(const std::shared_ptr<kn::Endpoint>& endpoint,
          const std::shared_ptr<kn::MemoryHandle>& local,
          const std::vector<std::int64_t>& local_offsets,
          const std::vector<std::uint64_t>& remote_addresses,
          const std::vector<std::int64_t>& sizes, const std::shared_ptr<kn::RemoteKey>& rkey,
          nb::callable callback) {
  auto completion = python_completion(std::move(callback));
  nb::gil_scoped_release release;
  kn::post(direction, endpoint, local, local_offsets, remote_addresses, sizes, rkey,
           std::move(completion));
}

// A buffer-protocol export held for the length of one call.
class HeldBuffer {
 public:
  HeldBuffer(nb::handle object, bool writable, const char* what) {
    const int flags = (writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) | PyBUF_ANY_CONTIGUOUS;
    if (PyObject_GetBuffer(object.ptr(), &view_, flags) != 0) {
      nb::python_error error;
      throw kn::InvalidArgumentError(std::string(what) + " must be a " +
                                     (writable ? "writable, " : "") + "contiguous buffer (" +
                                     error.what() + ")");
    }
  }
  ~HeldBuffer() { PyBuffer_Release(&view_); }
  HeldBuffer(const HeldBuffer&) = delete;
  HeldBuffer& operator=(const HeldBuffer&) = delete;

  std::byte* data() const noexcept { return static_cast<std::byte*>(view_.buf); }
  std::uint64_t length() const noexcept { return static_cast<std::uint64_t>(view_.len); }

 private:
  Py_buffer view_{};
};

// copy_blocks: bounds-checked ranges between two buffers, copied and hashed
// with the GIL released; the buffers stay exported (so an mmap cannot be
// closed under the copy) until it is done.
std::vector<std::uint64_t> copy_blocks(nb::handle destination,
                                       const std::vector<std::int64_t>& destination_offsets,
                                       nb::handle source,
                                       const std::vector<std::int64_t>& source_offsets,
                                       const std::vector<std::int64_t>& sizes, unsigned threads) {
  if (destination_offsets.size() != sizes.size() || source_offsets.size() != sizes.size()) {
    throw kn::InvalidArgumentError("destination_offsets, source_offsets and sizes differ in length (" +
                                   std::to_string(destination_offsets.size()) + ", " +
                                   std::to_string(source_offsets.size()) + ", " +
                                   std::to_string(sizes.size()) + ")");
  }
  HeldBuffer dst(destination, true, "the destination");
  HeldBuffer src(source, false, "the source");
  std::vector<kn::CopyRange> ranges;
  ranges.reserve(sizes.size());
  const auto inside = [](std::int64_t offset, std::int64_t size, std::uint64_t length) {
    return offset >= 0 && size >= 0 && static_cast<std::uint64_t>(offset) <= length &&
           static_cast<std::uint64_t>(size) <= length - static_cast<std::uint64_t>(offset);
  };
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const int index = static_cast<int>(i);
    if (!inside(destination_offsets[i], sizes[i], dst.length())) {
      throw kn::InvalidArgumentError("range " + std::to_string(i) + ": [" +
                                         std::to_string(destination_offsets[i]) + ", +" +
                                         std::to_string(sizes[i]) + ") is outside the destination of " +
                                         std::to_string(dst.length()) + " bytes",
                                     index);
    }
    if (!inside(source_offsets[i], sizes[i], src.length())) {
      throw kn::InvalidArgumentError("range " + std::to_string(i) + ": [" +
                                         std::to_string(source_offsets[i]) + ", +" +
                                         std::to_string(sizes[i]) + ") is outside the source of " +
                                         std::to_string(src.length()) + " bytes",
                                     index);
    }
    ranges.push_back({src.data() + source_offsets[i], dst.data() + destination_offsets[i],
                      static_cast<std::size_t>(sizes[i])});
  }
  nb::gil_scoped_release release;
  return kn::copy_and_hash(ranges, threads);
}

// process_blocks: ranges of a local buffer (the daemon's arena) filled from
// (`read`) or written into another process's memory at `remote_addresses`,
// hashed on the way, with the GIL released. The caller checks the remote
// ranges against what the request may touch; a failed system call is
// returned, not raised: (checksums, index of the first failed block or -1, errno).
nb::tuple process_blocks(int pid, nb::handle local, const std::vector<std::int64_t>& local_offsets,
                         const std::vector<std::uint64_t>& remote_addresses,
                         const std::vector<std::int64_t>& sizes, unsigned threads, bool read) {
  if (pid <= 0) {
    throw kn::InvalidArgumentError("pid must be positive, not " + std::to_string(pid));
  }
  if (local_offsets.size() != sizes.size() || remote_addresses.size() != sizes.size()) {
    throw kn::InvalidArgumentError("local_offsets, remote_addresses and sizes differ in length (" +
                                   std::to_string(local_offsets.size()) + ", " +
                                   std::to_string(remote_addresses.size()) + ", " +
                                   std::to_string(sizes.size()) + ")");
  }
  HeldBuffer buffer(local, read, "the local buffer");
  std::vector<kn::ProcessRange> ranges;
  ranges.reserve(sizes.size());
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const std::int64_t offset = local_offsets[i], size = sizes[i];
    if (offset < 0 || size < 0 || static_cast<std::uint64_t>(offset) > buffer.length() ||
        static_cast<std::uint64_t>(size) > buffer.length() - static_cast<std::uint64_t>(offset)) {
      throw kn::InvalidArgumentError("range " + std::to_string(i) + ": [" + std::to_string(offset) + ", +" +
                                         std::to_string(size) + ") is outside the local buffer of " +
                                         std::to_string(buffer.length()) + " bytes",
                                     static_cast<int>(i));
    }
    if (remote_addresses[i] > UINT64_MAX - static_cast<std::uint64_t>(size)) {
      throw kn::InvalidArgumentError("range " + std::to_string(i) + ": the remote address " +
                                         std::to_string(remote_addresses[i]) + " + " + std::to_string(size) +
                                         " overflows",
                                     static_cast<int>(i));
    }
    ranges.push_back({buffer.data() + offset, remote_addresses[i], static_cast<std::size_t>(size)});
  }
  kn::ProcessCopy result;
  {
    nb::gil_scoped_release release;
    result = read ? kn::read_process_and_hash(static_cast<pid_t>(pid), ranges, threads)
                  : kn::write_process_and_hash(static_cast<pid_t>(pid), ranges, threads);
  }
  return nb::make_tuple(result.checksums, static_cast<std::int64_t>(result.failed), result.error);
}

nb::bytes to_bytes(const std::string& s) { return nb::bytes(s.data(), s.size()); }

std::string from_bytes(const nb::bytes& b) { return std::string(b.c_str(), b.size()); }

// Seconds (as Python passes them) to a grace period; negative means none.
std::chrono::milliseconds to_grace(double seconds) {
  if (!(seconds > 0)) {
    return std::chrono::milliseconds(0);
  }
  return std::chrono::milliseconds(static_cast<std::int64_t>(std::min(seconds, 86400.0) * 1000));
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "UCX data plane of kvstore (private: use kvstore._native).";
  // Native objects may legitimately outlive the interpreter's last
  // reference to them (a transfer in flight at exit holds its endpoint).
  nb::set_leak_warnings(false);

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const kn::Error& error) {
      raise_native(error);
    }
  });

  m.attr("FAMILY_TRANSPORT") = static_cast<int>(kn::Family::kTransport);
  m.attr("FAMILY_ENDPOINT_CLOSED") = static_cast<int>(kn::Family::kEndpointClosed);
  m.attr("FAMILY_TIMED_OUT") = static_cast<int>(kn::Family::kTimedOut);
  m.attr("FAMILY_REGISTRATION") = static_cast<int>(kn::Family::kRegistration);
  m.attr("FAMILY_INVALID_ARGUMENT") = static_cast<int>(kn::Family::kInvalidArgument);
  m.attr("FAMILY_INVALID_REMOTE_KEY") = static_cast<int>(kn::Family::kInvalidRemoteKey);
  m.attr("UCP_API_VERSION") = nb::make_tuple(UCP_API_MAJOR, UCP_API_MINOR);

  m.def(
      "set_error_classes",
      [](nb::dict classes) {
        // Kept for the life of the process (set once, at import).
        error_classes = classes.release();
      },
      "classes"_a, "Register the exception class raised for each failure family.");
  m.def(
      "status_family", [](int status) { return static_cast<int>(kn::family_of(static_cast<ucs_status_t>(status))); },
      "status"_a, "The failure family of a UCX status code.");
  m.def(
      "status_string", [](int status) { return std::string(ucs_status_string(static_cast<ucs_status_t>(status))); },
      "status"_a, "UCX's description of a status code.");
  m.def(
      "ucx_version",
      [] {
        unsigned major = 0, minor = 0, release = 0;
        ucp_get_version(&major, &minor, &release);
        return nb::make_tuple(major, minor, release);
      },
      "The version of the UCX library loaded at run time.");

  m.def("copy_blocks", &copy_blocks, "destination"_a, "destination_offsets"_a, "source"_a,
        "source_offsets"_a, "sizes"_a, "threads"_a = 1,
        "Copy ranges of one buffer into another with the GIL released; returns the xxh3-64 of each.");
  m.def(
      "read_process_blocks",
      [](int pid, nb::handle destination, const std::vector<std::int64_t>& destination_offsets,
         const std::vector<std::uint64_t>& remote_addresses, const std::vector<std::int64_t>& sizes,
         unsigned threads) {
        return process_blocks(pid, destination, destination_offsets, remote_addresses, sizes, threads, true);
      },
      "pid"_a, "destination"_a, "destination_offsets"_a, "remote_addresses"_a, "sizes"_a, "threads"_a = 1,
      "Read ranges of process pid into a buffer (process_vm_readv), hashing each; "
      "(checksums, first failed index or -1, errno).");
  m.def(
      "write_process_blocks",
      [](int pid, nb::handle source, const std::vector<std::int64_t>& source_offsets,
         const std::vector<std::uint64_t>& remote_addresses, const std::vector<std::int64_t>& sizes,
         unsigned threads) {
        return process_blocks(pid, source, source_offsets, remote_addresses, sizes, threads, false);
      },
      "pid"_a, "source"_a, "source_offsets"_a, "remote_addresses"_a, "sizes"_a, "threads"_a = 1,
      "Write ranges of a buffer into process pid (process_vm_writev), hashing each; "
      "(checksums, first failed index or -1, errno).");
  nb::class_<kn::Context>(m, "Context")
      .def(nb::new_([](const std::string& tls, const kn::Context::Settings& settings) {
             nb::gil_scoped_release release;  // ucp_init loads transport modules
             return kn::Context::create(tls, settings);
           }),
           "tls"_a = "", "settings"_a = kn::Context::Settings{})
      .def_prop_ro("tls", [](const kn::Context& c) { return c.tls(); });

  nb::class_<kn::MemoryHandle>(m, "MemoryHandle")
      .def_prop_ro("address", &kn::MemoryHandle::address)
      .def_prop_ro("length", &kn::MemoryHandle::length)
      .def_prop_ro("packed_rkey", [](const kn::MemoryHandle& h) { return to_bytes(h.packed_rkey()); });

  m.def("register_buffer", &register_buffer, "context"_a, "buffer"_a,
        "Register a writable buffer-protocol object; the handle holds the buffer until released.");
  m.def(
      "register_ptr",
      [](const std::shared_ptr<kn::Context>& context, std::uintptr_t address, std::size_t length) {
        nb::gil_scoped_release release;
        return kn::MemoryHandle::map(context, reinterpret_cast<void*>(address), length);
      },
      "context"_a, "address"_a, "length"_a,
      "Register a raw range; the caller keeps the memory alive.");

  nb::class_<kn::Worker>(m, "Worker")
      .def(nb::new_([](const std::shared_ptr<kn::Context>& context, std::int64_t busy_poll_us,
                       int wait_timeout_ms) {
             if (busy_poll_us < 0 || wait_timeout_ms <= 0) {
               throw kn::InvalidArgumentError(
                   "busy_poll_us must be >= 0 and wait_timeout_ms > 0");
             }
             kn::Worker::Options options;
             options.busy_poll = std::chrono::microseconds(busy_poll_us);
             options.wait_timeout_ms = wait_timeout_ms;
             nb::gil_scoped_release release;
             return kn::Worker::create(context, options, &run_with_gil);
           }),
           "context"_a, "busy_poll_us"_a = 50, "wait_timeout_ms"_a = 2)
      .def_prop_ro("address", [](const kn::Worker& w) { return to_bytes(w.address()); })
      .def_prop_ro("closed", &kn::Worker::closed)
      .def(
          "connect",
          [](const std::shared_ptr<kn::Worker>& worker, const nb::bytes& address) {
            std::string packed = from_bytes(address);
            nb::gil_scoped_release release;
            return kn::Endpoint::create(worker, packed);
          },
          "address"_a)
      .def(
          "close",
          [](kn::Worker& worker, double timeout) { worker.close(to_grace(timeout)); },
          "timeout"_a = 0.0, nb::call_guard<nb::gil_scoped_release>());

  nb::class_<kn::Endpoint>(m, "Endpoint")
      .def_prop_ro("failed", &kn::Endpoint::failed)
      .def_prop_ro("failure_status", [](const kn::Endpoint& e) { return static_cast<int>(e.failure()); })
      .def_prop_ro("closed", &kn::Endpoint::closed)
      .def_prop_ro("transports", &kn::Endpoint::transports)
      .def(
          "unpack_rkey",
          [](const std::shared_ptr<kn::Endpoint>& endpoint, const nb::bytes& packed,
             std::uint64_t region_address, std::uint64_t region_length) {
            std::string raw = from_bytes(packed);
            nb::gil_scoped_release release;
            return kn::RemoteKey::unpack(endpoint, raw, region_address, region_length);
          },
          "packed"_a, "region_address"_a = 0, "region_length"_a = 0)
      .def("get", &post<kn::Direction::kGet>, "local"_a, "local_offsets"_a,
           "remote_addresses"_a, "sizes"_a, "rkey"_a, "callback"_a)
      .def("put", &post<kn::Direction::kPut>, "local"_a, "local_offsets"_a,
           "remote_addresses"_a, "sizes"_a, "rkey"_a, "callback"_a)
      .def(
          "close",
          [](kn::Endpoint& endpoint, double timeout) { endpoint.close(to_grace(timeout)); },
          "timeout"_a = 0.0, nb::call_guard<nb::gil_scoped_release>());

  nb::class_<kn::RemoteKey>(m, "RemoteKey")
      .def_prop_ro("bounded", &kn::RemoteKey::bounded);
}
