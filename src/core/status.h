// Status and Result<T>: how errors cross module boundaries in eep (leveldb/NIXL style).
// A Status carries a code and a message; context is prepended as it travels up, so the
// final message names the file, tensor, rank or flag at fault.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace eep {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,
  kNotFound,
  kIOError,
  kCorruption,
  kOutOfRange,
  kTimeout,
  kRemoteDisconnect,
  kCancelled,
  kInProgress,
  kUnavailable,
  kUnimplemented,
  kResourceExhausted,
  kAlreadyExists,
  kInternal,
};

const char* StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
  static Status NotFound(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
  static Status IOError(std::string m) { return {StatusCode::kIOError, std::move(m)}; }
  static Status Corruption(std::string m) { return {StatusCode::kCorruption, std::move(m)}; }
  static Status OutOfRange(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
  static Status Timeout(std::string m) { return {StatusCode::kTimeout, std::move(m)}; }
  static Status RemoteDisconnect(std::string m) { return {StatusCode::kRemoteDisconnect, std::move(m)}; }
  static Status Cancelled(std::string m) { return {StatusCode::kCancelled, std::move(m)}; }
  static Status InProgress() { return {StatusCode::kInProgress, "in progress"}; }
  static Status Unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
  static Status Unimplemented(std::string m) { return {StatusCode::kUnimplemented, std::move(m)}; }
  static Status ResourceExhausted(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
  static Status AlreadyExists(std::string m) { return {StatusCode::kAlreadyExists, std::move(m)}; }
  static Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // "Code: message", or "OK".
  std::string ToString() const;

  // Returns a copy whose message is "context: message"; OK stays OK.
  Status WithContext(const std::string& context) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// Holds either a value or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {  // NOLINT
    if (status_.ok()) status_ = Status::Internal("Result constructed from OK status without value");
  }

  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  T& operator*() & { return *value_; }
  const T& operator*() const& { return *value_; }

 private:
  std::optional<T> value_;
  Status status_;
};

}  // namespace eep

#define EEP_CONCAT_INNER_(a, b) a##b
#define EEP_CONCAT_(a, b) EEP_CONCAT_INNER_(a, b)

#define EEP_RETURN_IF_ERROR(expr)                  \
  do {                                             \
    ::eep::Status eep_status_ = (expr);            \
    if (!eep_status_.ok()) return eep_status_;     \
  } while (0)

// Adds "ctx: " in front of the message of a failing status.
#define EEP_RETURN_IF_ERROR_CTX(expr, ctx)                              \
  do {                                                                  \
    ::eep::Status eep_status_ = (expr);                                 \
    if (!eep_status_.ok()) return eep_status_.WithContext(ctx);        \
  } while (0)

#define EEP_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr, ctx_expr) \
  auto tmp = (expr);                                         \
  if (!tmp.ok()) return tmp.status().WithContext(ctx_expr); \
  lhs = std::move(tmp).value()

// lhs = value of expr (a Result), or return its status.
#define EEP_ASSIGN_OR_RETURN(lhs, expr) \
  EEP_ASSIGN_OR_RETURN_IMPL_(EEP_CONCAT_(eep_result_, __LINE__), lhs, expr, std::string())

#define EEP_ASSIGN_OR_RETURN_CTX(lhs, expr, ctx) \
  EEP_ASSIGN_OR_RETURN_IMPL_(EEP_CONCAT_(eep_result_, __LINE__), lhs, expr, ctx)
