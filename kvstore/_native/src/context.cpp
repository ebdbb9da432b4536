#include "context.h"

#include <cstdlib>
#include <string>
#include <utility>

#include "status.h"

namespace kvstore::native {

namespace {

struct ConfigDeleter {
  void operator()(ucp_config_t* config) const noexcept { ucp_config_release(config); }
};

}  // namespace

std::shared_ptr<Context> Context::create(const std::string& tls, const Settings& settings) {
  return std::shared_ptr<Context>(new Context(tls, settings));
}

Context::Context(std::string tls, const Settings& settings) : tls_(std::move(tls)) {
  ucp_config_t* raw = nullptr;
  ucs_status_t status = ucp_config_read(nullptr, nullptr, &raw);
  if (status != UCS_OK) {
    throw_status(status, "cannot read the UCX configuration");
  }
  std::unique_ptr<ucp_config_t, ConfigDeleter> config(raw);

  // This context never uses rendezvous (no TAG/AM feature), but while a
  // rendezvous threshold is set UCX demands memory invalidation from every
  // high-bandwidth RMA lane of an endpoint with peer-failure handling, which
  // rules out CMA (zero-copy shared memory) and leaves RMA to be emulated
  // over TCP. Settings below may still override it.
  status = ucp_config_modify(config.get(), "RNDV_THRESH", "inf");
  if (status != UCS_OK) {
    throw_status(status, "cannot configure UCX");
  }
  // Over TCP, UCX emulates a remote read (the daemon taking a client's put)
  // with replies of one TX segment each, 8 KiB by default: 256 KiB segments
  // halve the CPU a 32 MiB batch costs both sides. Every kvstore process uses
  // these defaults, since a peer must receive whole segments: RX is larger
  // than TX so that a peer configured with up to 512 KiB still fits. The
  // UCX_TCP_* environment, then `settings`, override them.
  for (const auto& [name, value] : {std::pair{"TCP_TX_SEG_SIZE", "256K"}, std::pair{"TCP_RX_SEG_SIZE", "512K"}}) {
    if (std::getenv((std::string("UCX_") + name).c_str()) != nullptr) {
      continue;
    }
    status = ucp_config_modify(config.get(), name, value);
    if (status != UCS_OK) {
      throw_status(status, "cannot configure UCX");
    }
  }
  for (const auto& [name, value] : settings) {
    status = ucp_config_modify(config.get(), name.c_str(), value.c_str());
    if (status != UCS_OK) {
      throw InvalidArgumentError(status,
                                 describe(status, "invalid UCX setting " + name + "=" + value));
    }
  }
  if (!tls_.empty()) {
    status = ucp_config_modify(config.get(), "TLS", tls_.c_str());
    if (status != UCS_OK) {
      throw InvalidArgumentError(status, describe(status, "invalid transport list '" + tls_ + "'"));
    }
  }

  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED |
                      UCP_PARAM_FIELD_NAME;
  // RMA for the data plane; WAKEUP so the progress thread can sleep on the
  // worker's event fd instead of spinning.
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
  // Memory is registered from Python threads while progress threads run.
  params.mt_workers_shared = 1;
  params.name = "kvstore";
  status = ucp_init(&params, config.get(), &context_);
  if (status != UCS_OK) {
    context_ = nullptr;
    if (!tls_.empty() && (status == UCS_ERR_NO_DEVICE || status == UCS_ERR_NO_ELEM ||
                          status == UCS_ERR_UNSUPPORTED)) {
      throw InvalidArgumentError(status,
                                 describe(status, "no usable transport in '" + tls_ + "'"));
    }
    throw_status(status, "cannot initialize UCX");
  }
}

Context::~Context() {
  if (context_ != nullptr) {
    ucp_cleanup(context_);
  }
}

}  // namespace kvstore::native
