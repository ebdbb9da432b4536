// A UCP context: the transports and memory domains one process role uses.
#pragma once

#include <ucp/api/ucp.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace kvstore::native {

class Context : public std::enable_shared_from_this<Context> {
 public:
  using Settings = std::vector<std::pair<std::string, std::string>>;

  // `tls` is a UCX transport list ("shm,tcp", "tcp", "all"); empty means
  // UCX's default (UCX_TLS from the environment, else "all"). `settings`
  // are further UCX variables without the UCX_ prefix ({"NET_DEVICES",
  // "lo"}). Both apply to this context's configuration only, never to the
  // process environment, and win over UCX_* environment variables.
  static std::shared_ptr<Context> create(const std::string& tls, const Settings& settings = {});
  ~Context();

  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  ucp_context_h handle() const noexcept { return context_; }
  const std::string& tls() const noexcept { return tls_; }

 private:
  Context(std::string tls, const Settings& settings);

  std::string tls_;
  ucp_context_h context_ = nullptr;
};

}  // namespace kvstore::native
