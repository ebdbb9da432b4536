// Failure families of the data plane: one exception class per family and the
// one translator from ucs_status_t to a family. The Python shim maps each
// family to one kvstore.errors class, so callers never see raw UCX codes
// unless they ask for them (Error::status()).
#pragma once

#include <ucs/type/status.h>

#include <stdexcept>
#include <string>
#include <string_view>

namespace kvstore::native {

enum class Family : int {
  kTransport = 0,         // any UCX failure not listed below
  kEndpointClosed = 1,    // the peer died, the link broke, or the endpoint was closed
  kTimedOut = 2,          // UCX gave up waiting
  kRegistration = 3,      // no memory or resources to register a range
  kInvalidArgument = 4,   // the caller's arguments are wrong; nothing reached UCX
  kInvalidRemoteKey = 5,  // a packed remote key could not be unpacked
};

// What was being done when the status came back; it refines the family
// (NO_MEMORY while mapping memory is a registration failure, while
// transferring it is a transport failure).
enum class Operation { kTransfer, kRegister, kUnpackRemoteKey };

class Error : public std::runtime_error {
 public:
  Error(ucs_status_t status, const std::string& what, int index = -1)
      : std::runtime_error(what), status_(status), index_(index) {}
  ucs_status_t status() const noexcept { return status_; }
  // The offending descriptor of a batch, or -1.
  int index() const noexcept { return index_; }
  virtual Family family() const noexcept = 0;

 private:
  ucs_status_t status_;
  int index_;
};

#define KVSTORE_NATIVE_ERROR(Name, Base, FamilyValue)                  \
  class Name : public Base {                                           \
   public:                                                             \
    using Base::Base;                                                  \
    Family family() const noexcept override { return FamilyValue; }    \
  }

KVSTORE_NATIVE_ERROR(TransportError, Error, Family::kTransport);
KVSTORE_NATIVE_ERROR(EndpointClosedError, Error, Family::kEndpointClosed);
KVSTORE_NATIVE_ERROR(TimedOutError, Error, Family::kTimedOut);
KVSTORE_NATIVE_ERROR(RegistrationError, Error, Family::kRegistration);

#undef KVSTORE_NATIVE_ERROR

class InvalidArgumentError : public Error {
 public:
  explicit InvalidArgumentError(const std::string& what, int index = -1)
      : Error(UCS_ERR_INVALID_PARAM, what, index) {}
  InvalidArgumentError(ucs_status_t status, const std::string& what) : Error(status, what) {}
  Family family() const noexcept override { return Family::kInvalidArgument; }
};

class InvalidRemoteKeyError : public InvalidArgumentError {
 public:
  using InvalidArgumentError::InvalidArgumentError;
  Family family() const noexcept override { return Family::kInvalidRemoteKey; }
};

// The translator: which family a UCX status belongs to.
inline Family family_of(ucs_status_t status, Operation op = Operation::kTransfer) noexcept {
  if (op == Operation::kUnpackRemoteKey) {
    return Family::kInvalidRemoteKey;
  }
  if (op == Operation::kRegister &&
      (status == UCS_ERR_NO_MEMORY || status == UCS_ERR_NO_RESOURCE)) {
    return Family::kRegistration;
  }
  switch (status) {
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_NOT_CONNECTED:
    // Operations are canceled when their endpoint is closed or has failed.
    case UCS_ERR_CANCELED:
      return Family::kEndpointClosed;
    case UCS_ERR_TIMED_OUT:
      return Family::kTimedOut;
    default:
      break;
  }
  // Whole ranges UCX reserves for link and endpoint failures.
  if ((status <= UCS_ERR_FIRST_LINK_FAILURE && status >= UCS_ERR_LAST_LINK_FAILURE) ||
      (status <= UCS_ERR_FIRST_ENDPOINT_FAILURE && status >= UCS_ERR_LAST_ENDPOINT_FAILURE)) {
    return Family::kEndpointClosed;
  }
  return Family::kTransport;
}

// "what: <UCX's description>".
inline std::string describe(ucs_status_t status, std::string_view what) {
  std::string message(what);
  message += ": ";
  message += ucs_status_string(status);
  return message;
}

[[noreturn]] inline void throw_status(ucs_status_t status, std::string_view what,
                                      Operation op = Operation::kTransfer) {
  const std::string message = describe(status, what);
  switch (family_of(status, op)) {
    case Family::kEndpointClosed:
      throw EndpointClosedError(status, message);
    case Family::kTimedOut:
      throw TimedOutError(status, message);
    case Family::kRegistration:
      throw RegistrationError(status, message);
    case Family::kInvalidRemoteKey:
      throw InvalidRemoteKeyError(status, message);
    case Family::kInvalidArgument:
    case Family::kTransport:
      break;
  }
  throw TransportError(status, message);
}

}  // namespace kvstore::native
