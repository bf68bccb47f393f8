// A small etcd v3 client over etcd's JSON gateway (HTTP POST /v3/kv/range, /v3/kv/put,
// /v3/kv/txn, /v3/lease/*; keys and values travel base64-encoded). eep needs only a handful
// of calls: keys with leases (liveness), compare-and-swap transactions (a stale coordinator
// cannot overwrite a newer epoch), prefix reads, and waiting for a key to change. No consensus
// is written here: etcd does that.
//
//   auto etcd = EtcdClient::Connect("etcd://10.0.0.1:2379,10.0.0.2:2379");
//   auto lease = LeaseKeeper::Start(url, /*ttl_seconds=*/2);         // kept alive in the background
//   (*etcd)->Put("/eep/c1/nodes/a", "{...}", (*lease)->id());        // gone when the holder dies
//   bool won = *(*etcd)->PutIf("/eep/c1/leader", me, /*expected_mod_revision=*/0, (*lease)->id());
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"

namespace eep::cluster {

struct EtcdKv {
  std::string key, value;
  int64_t create_revision = 0;
  int64_t mod_revision = 0;
  int64_t version = 0;
  int64_t lease = 0;
};

// Parses "etcd://HOST:PORT[,HOST:PORT...]" (the scheme may be omitted) into "HOST:PORT" items;
// kInvalidArgument naming `flag` otherwise.
Result<std::vector<std::string>> ParseEtcdUrl(const std::string& url, const std::string& flag = "--coordinator");

// Thread-safe: calls take turns on one keep-alive connection per endpoint, except
// WaitForChange, which opens its own and so never holds up the others. Every call fails over to
// the next endpoint on a connection error (compare-and-swap only when the request cannot have
// reached etcd); errors name the endpoint and the key.
class EtcdClient {
 public:
  // Validates `url` only; nothing is contacted until the first call. `timeout_ms` bounds each
  // connect and each reply of a call, per endpoint.
  static Result<std::unique_ptr<EtcdClient>> Connect(const std::string& url, int64_t timeout_ms = 2000);
  ~EtcdClient();

  const std::vector<std::string>& endpoints() const;

  // Returns the store revision after the put.
  Result<int64_t> Put(const std::string& key, const std::string& value, int64_t lease = 0);
  Result<std::optional<EtcdKv>> Get(const std::string& key);
  // Every key starting with `prefix`, in key order; *revision (optional) = store revision.
  Result<std::vector<EtcdKv>> GetPrefix(const std::string& prefix, int64_t* revision = nullptr);
  Status Delete(const std::string& key);
  Status DeletePrefix(const std::string& prefix);
  // Compare-and-swap: puts only if the key's mod_revision equals `expected_mod_revision`
  // (0: only if the key does not exist). Returns whether it was applied; when not, *current
  // (optional) holds the key as it is now (nullopt if absent). When applied, *new_revision
  // (optional) is the key's new mod_revision (the next PutIf's expected value).
  Result<bool> PutIf(const std::string& key, const std::string& value, int64_t expected_mod_revision, int64_t lease = 0,
                     std::optional<EtcdKv>* current = nullptr, int64_t* new_revision = nullptr);
  // Deletes only if the key's mod_revision equals `expected_mod_revision`.
  Result<bool> DeleteIf(const std::string& key, int64_t expected_mod_revision);

  // Leases. TTLs are whole seconds (etcd's unit; it may raise tiny TTLs to its minimum).
  // *granted_ttl_seconds (optional): the TTL etcd applied (at least its minimum, about
  // 1.5 election timeouts rounded up).
  Result<int64_t> LeaseGrant(int64_t ttl_seconds, int64_t* granted_ttl_seconds = nullptr);
  // One refresh. kNotFound once the lease has expired or been revoked.
  Status LeaseKeepAlive(int64_t lease);
  Status LeaseRevoke(int64_t lease);

  // Blocks until a key under `prefix` changes at a revision > `after_revision`, or timeout_ms
  // passes (kTimeout). Implemented with the gateway's streaming /v3/watch (or polling where
  // that is not possible); never a busy loop. Returns the revision of the change.
  Result<int64_t> WaitForChange(const std::string& prefix, int64_t after_revision, int64_t timeout_ms);

  class Impl;

 private:
  explicit EtcdClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Grants a lease and keeps it alive from a background thread (every TTL/3). When a refresh
// fails past the TTL (etcd unreachable, lease expired), lost() turns true and `on_lost` runs
// once (from the keeper thread; it must not destroy the keeper). The destructor stops the
// thread and revokes the lease (unless lost or abandoned). The keeper has its own client.
class LeaseKeeper {
 public:
  static Result<std::unique_ptr<LeaseKeeper>> Start(const std::string& url, int64_t ttl_seconds,
                                                    std::function<void()> on_lost = nullptr);
  ~LeaseKeeper();
  int64_t id() const;
  bool lost() const;
  // Stops refreshing without revoking (the lease then expires after its TTL): for tests that
  // simulate a process whose host died.
  void Abandon();

  class Impl;

 private:
  explicit LeaseKeeper(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace eep::cluster
