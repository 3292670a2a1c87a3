// keeld's REST API (v1): routes on an HttpServer, backed by the managers. docs/hostd.md and
// /v1/openapi.json describe it.
#pragma once

#include <string>

#include "hostd/domain_manager.h"
#include "hostd/event_bus.h"
#include "hostd/http.h"
#include "hostd/network.h"
#include "hostd/storage.h"

namespace keel::hostd {

struct ApiContext {
  DomainManager& domains;
  StoragePools& pools;
  Networks& networks;
  EventBus& events;
  std::string token;  // required (Bearer) on TCP; the unix socket is guarded by file permissions
};

// Registers every route.
void install_api(HttpServer& server, ApiContext& ctx);

// Maps an Error's code to an HTTP status: ENOENT 404, EEXIST/EBUSY 409, EINVAL 400, else 500.
HttpResponse error_response(const Error& e);

// The OpenAPI 3 document.
nlohmann::json openapi_document();

}  // namespace keel::hostd
