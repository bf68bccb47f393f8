// etcd v3 over its JSON gateway (grpc-gateway in front of the gRPC API; etcd 3.4 serves it at
// /v3/). Every request is a POST of a JSON body; bytes fields (keys, values) are base64 and
// int64 fields come back as JSON strings; proto3 omits fields that hold their default value
// (a failed txn has no "succeeded", an expired lease's keepalive has no "TTL").
#include "cluster/etcd.h"

#include <httplib.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/logging.h"
#include "core/util.h"

namespace eep::cluster {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {


// ---- JSON helpers ------------------------------------------------------------------------

// An int64 field that the gateway writes as a string ("42") or, from other gateways, a number;
// 0 when absent (proto3 default).
int64_t JsonInt64(const json& obj, const char* field) {
  if (!obj.is_object()) return 0;
  auto it = obj.find(field);
  if (it == obj.end() || it->is_null()) return 0;
  if (it->is_number_integer()) return it->get<int64_t>();
  if (it->is_number()) return static_cast<int64_t>(it->get<double>());
  if (it->is_string()) {
    try {
      return std::stoll(it->get<std::string>());
    } catch (...) {
      return 0;
    }
  }
  return 0;
}

bool JsonBool(const json& obj, const char* field) {
  if (!obj.is_object()) return false;
  auto it = obj.find(field);
  return it != obj.end() && it->is_boolean() && it->get<bool>();
}

std::string JsonBytes(const json& obj, const char* field, bool* ok) {
  if (!obj.is_object()) return {};
  auto it = obj.find(field);
  if (it == obj.end() || !it->is_string()) return {};
  auto decoded = Base64Decode(it->get<std::string>());
  if (!decoded.ok()) {
    *ok = false;
    return {};
  }
  return *decoded;
}

Result<EtcdKv> ParseKv(const json& j) {
  bool ok = true;
  EtcdKv kv;
  kv.key = JsonBytes(j, "key", &ok);
  kv.value = JsonBytes(j, "value", &ok);
  if (!ok) return Status::Corruption("etcd returned a key or value that is not valid base64");
  kv.create_revision = JsonInt64(j, "create_revision");
  kv.mod_revision = JsonInt64(j, "mod_revision");
  kv.version = JsonInt64(j, "version");
  kv.lease = JsonInt64(j, "lease");
  return kv;
}

Result<std::vector<EtcdKv>> ParseKvs(const json& range_response) {
  std::vector<EtcdKv> out;
  auto it = range_response.find("kvs");
  if (it == range_response.end() || !it->is_array()) return out;
  for (const auto& item : *it) {
    EEP_ASSIGN_OR_RETURN(EtcdKv kv, ParseKv(item));
    out.push_back(std::move(kv));
  }
  return out;
}

// The smallest key greater than every key starting with `prefix` (etcd's range_end for a
// prefix); "\0" means "to the end of the keyspace" (empty or all-0xff prefix).
std::string PrefixEnd(const std::string& prefix) {
  std::string end = prefix;
  while (!end.empty()) {
    if (uint8_t(end.back()) < 0xff) {
      end.back() = char(uint8_t(end.back()) + 1);
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');
}

// A range over every key under `prefix`: {"key", "range_end"} (base64).
json PrefixRange(const std::string& prefix) {
  // An empty key with range_end "\0" is etcd's "all keys"; the gateway rejects an empty key,
  // so use "\0" as the start (the smallest non-empty key).
  std::string start = prefix.empty() ? std::string(1, '\0') : prefix;
  return json{{"key", Base64Encode(start)}, {"range_end", Base64Encode(PrefixEnd(prefix))}};
}

// gRPC status codes the gateway reports in {"code": N}.
StatusCode FromGrpcCode(int64_t code) {
  switch (code) {
    case 3: return StatusCode::kInvalidArgument;   // INVALID_ARGUMENT
    case 4: return StatusCode::kTimeout;           // DEADLINE_EXCEEDED
    case 5: return StatusCode::kNotFound;          // NOT_FOUND
    case 6: return StatusCode::kAlreadyExists;     // ALREADY_EXISTS
    case 8: return StatusCode::kResourceExhausted; // RESOURCE_EXHAUSTED
    case 9: return StatusCode::kInvalidArgument;   // FAILED_PRECONDITION
    case 11: return StatusCode::kOutOfRange;       // OUT_OF_RANGE
    case 12: return StatusCode::kUnimplemented;    // UNIMPLEMENTED
    case 14: return StatusCode::kUnavailable;      // UNAVAILABLE (no leader, stopping)
    default: return StatusCode::kInternal;
  }
}

// The gateway's error text: {"error": "...", "message": "...", "code": N} for unary calls,
// {"error": {"grpc_code": N, "message": "..."}} inside a stream.
std::string GatewayError(const json& body, int64_t* grpc_code) {
  *grpc_code = 0;
  if (!body.is_object()) return {};
  if (auto it = body.find("error"); it != body.end() && it->is_object()) {
    *grpc_code = JsonInt64(*it, "grpc_code");
    auto m = it->find("message");
    return m != it->end() && m->is_string() ? m->get<std::string>() : it->dump();
  }
  *grpc_code = JsonInt64(body, "code");
  for (const char* field : {"message", "error"}) {
    auto it = body.find(field);
    if (it != body.end() && it->is_string() && !it->get<std::string>().empty()) return it->get<std::string>();
  }
  return {};
}

struct HostPort {
  std::string host;  // without IPv6 brackets
  int port = 0;
};

Result<HostPort> SplitHostPort(const std::string& item) {
  HostPort hp;
  std::string port;
  if (!item.empty() && item[0] == '[') {
    auto close = item.find(']');
    if (close == std::string::npos || close + 1 >= item.size() || item[close + 1] != ':')
      return Status::InvalidArgument("endpoint \"" + item + "\" is not [IPV6]:PORT");
    hp.host = item.substr(1, close - 1);
    port = item.substr(close + 2);
  } else {
    auto colon = item.rfind(':');
    if (colon == std::string::npos) return Status::InvalidArgument("endpoint \"" + item + "\" has no port");
    hp.host = item.substr(0, colon);
    port = item.substr(colon + 1);
  }
  if (hp.host.empty()) return Status::InvalidArgument("endpoint \"" + item + "\" has no host");
  if (port.empty() || port.size() > 5 || !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return Status::InvalidArgument("endpoint \"" + item + "\" has a bad port \"" + port + "\"");
  hp.port = std::stoi(port);
  if (hp.port < 1 || hp.port > 65535)
    return Status::InvalidArgument("endpoint \"" + item + "\" has port " + port + " outside 1..65535");
  return hp;
}

void SetTimeouts(httplib::Client& client, int64_t connect_ms, int64_t read_ms) {
  connect_ms = std::max<int64_t>(connect_ms, 1);
  read_ms = std::max<int64_t>(read_ms, 1);
  client.set_connection_timeout(connect_ms / 1000, (connect_ms % 1000) * 1000);
  client.set_read_timeout(read_ms / 1000, (read_ms % 1000) * 1000);
  client.set_write_timeout(connect_ms / 1000, (connect_ms % 1000) * 1000);
}

std::string DescribeHttpError(httplib::Error err) {
  switch (err) {
    case httplib::Error::Connection: return "cannot connect (refused or unreachable)";
    case httplib::Error::ConnectionTimeout: return "connect timed out";
    case httplib::Error::Read: return "no complete reply (read failed or timed out)";
    case httplib::Error::Write: return "could not send the request";
    default: return httplib::to_string(err);
  }
}

struct HttpReply {
  int status = 0;
  std::string body;
};

// POSTs a JSON body; Success once a whole reply is in *reply.
httplib::Error PostJson(httplib::Client& client, const char* path, const std::string& payload, HttpReply* reply) {
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.body = payload;
  req.set_header("Content-Type", "application/json");
  req.response_handler = [reply](const httplib::Response& r) {
    reply->status = r.status;
    return true;
  };
  req.content_receiver = [reply](const char* data, size_t len, uint64_t, uint64_t) {
    reply->body.append(data, len);
    return true;
  };
  httplib::Response res;
  httplib::Error err = httplib::Error::Success;
  client.send(req, res, err);
  // etcd 3.4's gateway ends every error reply with a chunked-encoding trailer
  // (Grpc-Trailer-Content-Type) that httplib 0.11 cannot parse: it reports a read error after
  // handing over the whole body. A complete JSON body with a status is a complete reply.
  if (err == httplib::Error::Read && reply->status != 0 && reply->status != 200 &&
      json::accept(reply->body))
    return httplib::Error::Success;
  return err;
}

std::string Quoted(const std::string& key) {
  // Keys are usually printable paths; show others as escaped JSON so a log line stays one line.
  return json(key).dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace

// ---- ParseEtcdUrl ------------------------------------------------------------------------

Result<std::vector<std::string>> ParseEtcdUrl(const std::string& url, const std::string& flag) {
  auto bad = [&](const std::string& why) {
    return Status::InvalidArgument(flag + ": bad etcd URL \"" + url + "\": " + why +
                                   " (want etcd://HOST:PORT[,HOST:PORT...])");
  };
  std::string rest = url;
  if (auto scheme = rest.find("://"); scheme != std::string::npos) {
    std::string name = rest.substr(0, scheme);
    if (name != "etcd" && name != "http") return bad("scheme \"" + name + "\" is not etcd:// or http://");
    rest = rest.substr(scheme + 3);
  }
  if (rest.empty()) return bad("no endpoint");
  std::vector<std::string> endpoints;
  size_t start = 0;
  for (;;) {
    size_t comma = rest.find(',', start);
    std::string item = rest.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    while (!item.empty() && item.back() == '/') item.pop_back();
    if (item.empty()) return bad("empty endpoint in the list");
    auto hp = SplitHostPort(item);
    if (!hp.ok()) return bad(hp.status().message());
    endpoints.push_back(item);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return endpoints;
}

// ---- EtcdClient --------------------------------------------------------------------------

class EtcdClient::Impl {
 public:
  Impl(std::vector<std::string> endpoints, std::vector<HostPort> hosts, int64_t timeout_ms)
      : endpoints_(std::move(endpoints)), hosts_(std::move(hosts)), timeout_ms_(timeout_ms) {
    for (const auto& hp : hosts_) {
      auto client = std::make_unique<httplib::Client>(hp.host, hp.port);
      SetTimeouts(*client, timeout_ms_, timeout_ms_);
      client->set_keep_alive(true);
      clients_.push_back(std::move(client));
    }
  }

  // POSTs `body` to `path`, starting at the endpoint that answered last and moving on when one
  // cannot be reached (or answers "unavailable"). `what` ("put \"/k\"") goes into errors.
  // `resend_ok`: the call may be repeated on another endpoint after a failure that happened
  // once the request may have reached etcd (false for compare-and-swap: the first attempt may
  // have applied, and a resend would then report a spurious conflict).
  Result<json> Call(const char* path, const json& body, const std::string& what, bool resend_ok) {
    std::lock_guard<std::mutex> lock(mu_);
    const std::string payload = body.dump();
    std::string failures;
    for (size_t attempt = 0; attempt < clients_.size(); ++attempt) {
      size_t idx = (current_ + attempt) % clients_.size();
      const std::string& endpoint = endpoints_[idx];
      HttpReply res;
      httplib::Error err = PostJson(*clients_[idx], path, payload, &res);
      if (err != httplib::Error::Success) {
        std::string why = DescribeHttpError(err);
        bool never_sent = err == httplib::Error::Connection || err == httplib::Error::ConnectionTimeout;
        if (!never_sent && !resend_ok) {
          return Status::RemoteDisconnect("etcd " + endpoint + ": " + what + ": " + why +
                                          " after the request was sent (outcome unknown)");
        }
        failures += (failures.empty() ? "" : "; ") + endpoint + ": " + why;
        if (clients_.size() > 1) EEP_LOG_WARN("etcd {}: {}: {}; trying the next endpoint", endpoint, what, why);
        continue;
      }
      json reply = json::parse(res.body, nullptr, /*allow_exceptions=*/false);
      if (res.status == 200) {
        if (reply.is_discarded() || !reply.is_object())
          return Status::Corruption("etcd " + endpoint + ": " + what + ": reply is not a JSON object: " +
                                    res.body.substr(0, 200));
        current_ = idx;
        return reply;
      }
      int64_t grpc_code = 0;
      std::string text = GatewayError(reply, &grpc_code);
      if (text.empty()) text = res.body.substr(0, 200);
      std::string message = "etcd " + endpoint + ": " + what + ": HTTP " + std::to_string(res.status) + ": " + text;
      if (grpc_code == 14 && resend_ok) {
        // This member cannot serve (no leader, shutting down): another may.
        failures += (failures.empty() ? "" : "; ") + endpoint + ": " + text;
        if (clients_.size() > 1) EEP_LOG_WARN("{}; trying the next endpoint", message);
        continue;
      }
      current_ = idx;
      return Status(grpc_code != 0 ? FromGrpcCode(grpc_code) : StatusCode::kInternal, message);
    }
    return Status::Unavailable("etcd: " + what + ": no endpoint answered (" + failures + ")");
  }

  const std::vector<std::string> endpoints_;
  const std::vector<HostPort> hosts_;
  const int64_t timeout_ms_;

  size_t CurrentEndpoint() {
    std::lock_guard<std::mutex> lock(mu_);
    return current_;
  }

 private:
  std::mutex mu_;  // one request at a time; guards clients_ and current_
  std::vector<std::unique_ptr<httplib::Client>> clients_;
  size_t current_ = 0;  // the endpoint that answered last
};

EtcdClient::EtcdClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
EtcdClient::~EtcdClient() = default;

Result<std::unique_ptr<EtcdClient>> EtcdClient::Connect(const std::string& url, int64_t timeout_ms) {
  EEP_ASSIGN_OR_RETURN(std::vector<std::string> endpoints, ParseEtcdUrl(url));
  if (timeout_ms <= 0) return Status::InvalidArgument("etcd timeout_ms must be positive, got " + std::to_string(timeout_ms));
  std::vector<HostPort> hosts;
  for (const auto& e : endpoints) {
    EEP_ASSIGN_OR_RETURN(HostPort hp, SplitHostPort(e));
    hosts.push_back(hp);
  }
  return std::unique_ptr<EtcdClient>(new EtcdClient(std::make_unique<Impl>(endpoints, hosts, timeout_ms)));
}

const std::vector<std::string>& EtcdClient::endpoints() const { return impl_->endpoints_; }

Result<int64_t> EtcdClient::Put(const std::string& key, const std::string& value, int64_t lease) {
  json body{{"key", Base64Encode(key)}, {"value", Base64Encode(value)}};
  if (lease != 0) body["lease"] = std::to_string(lease);
  EEP_ASSIGN_OR_RETURN(json reply, impl_->Call("/v3/kv/put", body, "put " + Quoted(key), true));
  return JsonInt64(reply["header"], "revision");
}

Result<std::optional<EtcdKv>> EtcdClient::Get(const std::string& key) {
  json body{{"key", Base64Encode(key)}};
  EEP_ASSIGN_OR_RETURN(json reply, impl_->Call("/v3/kv/range", body, "get " + Quoted(key), true));
  EEP_ASSIGN_OR_RETURN(std::vector<EtcdKv> kvs, ParseKvs(reply));
  if (kvs.empty()) return std::optional<EtcdKv>();
  return std::optional<EtcdKv>(std::move(kvs.front()));
}

Result<std::vector<EtcdKv>> EtcdClient::GetPrefix(const std::string& prefix, int64_t* revision) {
  EEP_ASSIGN_OR_RETURN(json reply,
                       impl_->Call("/v3/kv/range", PrefixRange(prefix), "get prefix " + Quoted(prefix), true));
  if (revision != nullptr) *revision = JsonInt64(reply["header"], "revision");
  return ParseKvs(reply);
}

Status EtcdClient::Delete(const std::string& key) {
  json body{{"key", Base64Encode(key)}};
  auto reply = impl_->Call("/v3/kv/deleterange", body, "delete " + Quoted(key), true);
  return reply.ok() ? Status::Ok() : reply.status();
}

Status EtcdClient::DeletePrefix(const std::string& prefix) {
  auto reply = impl_->Call("/v3/kv/deleterange", PrefixRange(prefix), "delete prefix " + Quoted(prefix), true);
  return reply.ok() ? Status::Ok() : reply.status();
}

namespace {

// The txn compare "key's mod_revision == expected" (expected 0: "key does not exist", which
// etcd expresses as create_revision == 0).
json RevisionCompare(const std::string& key, int64_t expected_mod_revision) {
  json cmp{{"key", Base64Encode(key)}, {"result", "EQUAL"}};
  if (expected_mod_revision == 0) {
    cmp["target"] = "CREATE";
    cmp["create_revision"] = "0";
  } else {
    cmp["target"] = "MOD";
    cmp["mod_revision"] = std::to_string(expected_mod_revision);
  }
  return cmp;
}

}  // namespace

Result<bool> EtcdClient::PutIf(const std::string& key, const std::string& value, int64_t expected_mod_revision,
                               int64_t lease, std::optional<EtcdKv>* current, int64_t* new_revision) {
  json put{{"key", Base64Encode(key)}, {"value", Base64Encode(value)}};
  if (lease != 0) put["lease"] = std::to_string(lease);
  json body{{"compare", json::array({RevisionCompare(key, expected_mod_revision)})},
            {"success", json::array({json{{"request_put", put}}})},
            {"failure", json::array({json{{"request_range", json{{"key", Base64Encode(key)}}}}})}};
  EEP_ASSIGN_OR_RETURN(json reply,
                       impl_->Call("/v3/kv/txn", body,
                                   "put " + Quoted(key) + " if mod_revision == " + std::to_string(expected_mod_revision),
                                   false));
  bool succeeded = JsonBool(reply, "succeeded");
  // The transaction's revision is the put's mod_revision.
  if (succeeded && new_revision != nullptr && reply.contains("header")) *new_revision = JsonInt64(reply["header"], "revision");
  if (!succeeded && current != nullptr) {
    current->reset();
    const json& responses = reply["responses"];
    if (responses.is_array() && !responses.empty()) {
      EEP_ASSIGN_OR_RETURN(std::vector<EtcdKv> kvs, ParseKvs(responses[0]["response_range"]));
      if (!kvs.empty()) *current = std::move(kvs.front());
    }
  }
  return succeeded;
}

Result<bool> EtcdClient::DeleteIf(const std::string& key, int64_t expected_mod_revision) {
  json body{{"compare", json::array({RevisionCompare(key, expected_mod_revision)})},
            {"success", json::array({json{{"request_delete_range", json{{"key", Base64Encode(key)}}}}})}};
  EEP_ASSIGN_OR_RETURN(json reply, impl_->Call("/v3/kv/txn", body,
                                               "delete " + Quoted(key) + " if mod_revision == " +
                                                   std::to_string(expected_mod_revision),
                                               false));
  return JsonBool(reply, "succeeded");
}

Result<int64_t> EtcdClient::LeaseGrant(int64_t ttl_seconds, int64_t* granted_ttl_seconds) {
  if (ttl_seconds <= 0) return Status::InvalidArgument("etcd lease TTL must be >= 1 s, got " + std::to_string(ttl_seconds));
  std::string what = "lease grant (TTL " + std::to_string(ttl_seconds) + " s)";
  EEP_ASSIGN_OR_RETURN(json reply, impl_->Call("/v3/lease/grant", json{{"TTL", std::to_string(ttl_seconds)}}, what, true));
  if (auto it = reply.find("error"); it != reply.end() && it->is_string() && !it->get<std::string>().empty())
    return Status::Internal("etcd: " + what + ": " + it->get<std::string>());
  int64_t id = JsonInt64(reply, "ID");
  if (id == 0) return Status::Corruption("etcd: " + what + ": reply has no lease ID: " + reply.dump());
  if (granted_ttl_seconds != nullptr) *granted_ttl_seconds = std::max(JsonInt64(reply, "TTL"), ttl_seconds);
  return id;
}

Status EtcdClient::LeaseKeepAlive(int64_t lease) {
  std::string what = "lease keepalive " + std::to_string(lease);
  auto reply = impl_->Call("/v3/lease/keepalive", json{{"ID", std::to_string(lease)}}, what, true);
  if (!reply.ok()) return reply.status();
  // A streaming RPC behind the gateway: one {"result": {...}} or {"error": {...}} per message.
  int64_t grpc_code = 0;
  std::string error = GatewayError(*reply, &grpc_code);
  if (reply->contains("error")) return Status(FromGrpcCode(grpc_code), "etcd: " + what + ": " + error);
  // etcd answers an unknown (expired, revoked) lease with TTL 0, which proto3 omits.
  if (JsonInt64((*reply)["result"], "TTL") <= 0)
    return Status::NotFound("etcd: " + what + ": lease expired or was revoked");
  return Status::Ok();
}

Status EtcdClient::LeaseRevoke(int64_t lease) {
  auto reply = impl_->Call("/v3/lease/revoke", json{{"ID", std::to_string(lease)}},
                           "lease revoke " + std::to_string(lease), true);
  return reply.ok() ? Status::Ok() : reply.status();
}

Result<int64_t> EtcdClient::WaitForChange(const std::string& prefix, int64_t after_revision, int64_t timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(std::max<int64_t>(timeout_ms, 0));
  const std::string what = "watch prefix " + Quoted(prefix) + " after revision " + std::to_string(after_revision);
  json create = PrefixRange(prefix);
  create["start_revision"] = std::to_string(after_revision + 1);
  const std::string payload = json{{"create_request", create}}.dump();

  auto remaining_ms = [&] {
    return std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  };
  // A watch holds its own connection for as long as it waits, so it never blocks the client's
  // other calls (those share one connection per endpoint under the client's mutex).
  const size_t first = impl_->CurrentEndpoint();
  const size_t n = impl_->endpoints_.size();
  std::string failures;
  for (size_t attempt = 0; attempt < n; ++attempt) {
    size_t idx = (first + attempt) % n;
    const std::string& endpoint = impl_->endpoints_[idx];
    int64_t left = remaining_ms();
    if (left <= 0) break;
    httplib::Client client(impl_->hosts_[idx].host, impl_->hosts_[idx].port);
    // The read timeout bounds the wait: the stream is silent until an event arrives.
    SetTimeouts(client, std::min(impl_->timeout_ms_, left), left);

    int64_t changed_revision = 0;
    Status stream_error;
    std::string buffer;
    httplib::Request req;
    req.method = "POST";
    req.path = "/v3/watch";
    req.body = payload;
    req.set_header("Content-Type", "application/json");
    // One JSON message per line: {"result": {"created": true}}, then {"result": {"events": ...}}.
    req.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) {
      buffer.append(data, len);
      size_t nl;
      while ((nl = buffer.find('\n')) != std::string::npos) {
        json msg = json::parse(buffer.substr(0, nl), nullptr, false);
        buffer.erase(0, nl + 1);
        if (msg.is_discarded()) continue;
        if (msg.contains("error")) {
          int64_t grpc_code = 0;
          std::string text = GatewayError(msg, &grpc_code);
          stream_error = Status(FromGrpcCode(grpc_code), "etcd " + endpoint + ": " + what + ": " + text);
          return false;
        }
        const json& result = msg["result"];
        if (int64_t compacted = JsonInt64(result, "compact_revision"); compacted > 0) {
          // History after after_revision is gone: report "changed" so the caller re-reads.
          changed_revision = std::max(compacted, JsonInt64(result["header"], "revision"));
          return false;
        }
        if (JsonBool(result, "canceled")) {
          auto reason = result.find("cancel_reason");
          stream_error = Status::Internal("etcd " + endpoint + ": " + what + ": watch canceled" +
                                          (reason != result.end() && reason->is_string() ? ": " + reason->get<std::string>() : ""));
          return false;
        }
        auto events = result.find("events");
        if (events != result.end() && events->is_array()) {
          for (const auto& ev : *events) changed_revision = std::max(changed_revision, JsonInt64(ev["kv"], "mod_revision"));
          if (changed_revision > after_revision) return false;
          changed_revision = 0;
        }
      }
      return remaining_ms() > 0;
    };
    int http_status = 0;
    req.response_handler = [&http_status](const httplib::Response& r) {
      http_status = r.status;
      return true;
    };
    httplib::Response res;
    httplib::Error err = httplib::Error::Success;
    client.send(req, res, err);
    if (changed_revision > 0) return changed_revision;
    if (!stream_error.ok()) return stream_error;
    if (http_status != 0 && http_status != 200) {
      // (An error reply ends with a trailer httplib reports as a read error; see PostJson.)
      json reply = json::parse(buffer, nullptr, false);
      int64_t grpc_code = 0;
      std::string text = GatewayError(reply, &grpc_code);
      return Status(grpc_code != 0 ? FromGrpcCode(grpc_code) : StatusCode::kInternal,
                    "etcd " + endpoint + ": " + what + ": HTTP " + std::to_string(http_status) + ": " +
                        (text.empty() ? buffer.substr(0, 200) : text));
    }
    if (remaining_ms() <= 5) break;  // the read timed out: nothing changed in time
    // Could not connect, or the stream ended early (etcd stopped): try the next endpoint.
    std::string why = err == httplib::Error::Success ? "stream closed" : DescribeHttpError(err);
    failures += (failures.empty() ? "" : "; ") + endpoint + ": " + why;
    if (n > 1) EEP_LOG_WARN("etcd {}: {}: {}; trying the next endpoint", endpoint, what, why);
  }
  if (!failures.empty() && remaining_ms() > 5)
    return Status::Unavailable("etcd: " + what + ": no endpoint answered (" + failures + ")");
  return Status::Timeout("etcd: " + what + ": no change within " + std::to_string(timeout_ms) + " ms" +
                         (failures.empty() ? "" : " (" + failures + ")"));
}

// ---- LeaseKeeper -------------------------------------------------------------------------

class LeaseKeeper::Impl {
 public:
  Impl(std::unique_ptr<EtcdClient> client, int64_t id, int64_t ttl_seconds, std::function<void()> on_lost)
      : client_(std::move(client)), id_(id), ttl_(std::chrono::seconds(ttl_seconds)), on_lost_(std::move(on_lost)) {
    thread_ = std::thread([this] { Run(); });
  }

  ~Impl() {
    Stop();
    if (!abandoned_ && !lost_.load()) {
      Status st = client_->LeaseRevoke(id_);
      if (!st.ok() && st.code() != StatusCode::kNotFound)
        EEP_LOG_WARN("etcd lease {:x}: revoke failed (it expires by itself): {}", id_, st.ToString());
    }
  }

  // Stops the refresh thread; idempotent. Not to be called from on_lost (it joins that thread).
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  void Run() {
    const auto period = std::max<Clock::duration>(ttl_ / 3, std::chrono::milliseconds(100));
    auto last_ok = Clock::now();
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      if (cv_.wait_for(lock, period, [this] { return stop_; })) break;
      lock.unlock();
      Status st = client_->LeaseKeepAlive(id_);
      auto now = Clock::now();
      lock.lock();
      if (st.ok()) {
        last_ok = now;
        continue;
      }
      if (stop_) break;
      // Expired or revoked: gone for good. Unreachable: etcd may still hold it until the TTL
      // (counted from our last successful refresh) has passed; after that, assume it is gone.
      if (st.code() == StatusCode::kNotFound || now - last_ok >= ttl_) {
        EEP_LOG_ERROR("etcd lease {:x} lost: {}", id_, st.ToString());
        lost_.store(true);
        break;
      }
      EEP_LOG_WARN("etcd lease {:x}: refresh failed, retrying: {}", id_, st.ToString());
    }
    lock.unlock();
    if (lost_.load() && on_lost_) on_lost_();
  }

  const std::unique_ptr<EtcdClient> client_;
  const int64_t id_;
  const Clock::duration ttl_;
  const std::function<void()> on_lost_;
  std::atomic<bool> lost_{false};
  bool abandoned_ = false;  // touched only by the owner's thread

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;  // guarded by mu_
  std::thread thread_;
};

LeaseKeeper::LeaseKeeper(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
LeaseKeeper::~LeaseKeeper() = default;

Result<std::unique_ptr<LeaseKeeper>> LeaseKeeper::Start(const std::string& url, int64_t ttl_seconds,
                                                        std::function<void()> on_lost) {
  if (ttl_seconds <= 0) return Status::InvalidArgument("lease TTL must be >= 1 s, got " + std::to_string(ttl_seconds));
  // Each refresh must finish well within a refresh period, or one slow try eats the TTL.
  int64_t timeout_ms = std::clamp<int64_t>(ttl_seconds * 1000 / 3, 200, 2000);
  EEP_ASSIGN_OR_RETURN(std::unique_ptr<EtcdClient> client, EtcdClient::Connect(url, timeout_ms));
  int64_t granted_ttl = ttl_seconds;
  EEP_ASSIGN_OR_RETURN(int64_t id, client->LeaseGrant(ttl_seconds, &granted_ttl));
  return std::unique_ptr<LeaseKeeper>(
      new LeaseKeeper(std::make_unique<Impl>(std::move(client), id, granted_ttl, std::move(on_lost))));
}

int64_t LeaseKeeper::id() const { return impl_->id_; }
bool LeaseKeeper::lost() const { return impl_->lost_.load(); }

void LeaseKeeper::Abandon() {
  impl_->abandoned_ = true;
  impl_->Stop();
}

}  // namespace eep::cluster
