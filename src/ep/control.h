// Control-plane messages between the coordinator (ROUTER) and ranks (DEALER) over ZeroMQ:
// a JSON header frame and an optional binary payload frame. cppzmq throws; these wrappers
// turn that into Status so nothing escapes the room.
#pragma once

#include <string>

#include <nlohmann/json.hpp>
#include <zmq.hpp>

#include "core/status.h"

namespace eep::ep {

struct ControlMessage {
  nlohmann::json header;
  std::string payload;
};

// Sends `m`, prefixed by `identity` when non-empty (ROUTER side).
Status SendControl(zmq::socket_t& socket, const std::string& identity, const ControlMessage& m);

// Receives one message within timeout_ms (kTimeout otherwise). On a ROUTER socket the sender's
// identity is stored in *identity.
Result<ControlMessage> RecvControl(zmq::socket_t& socket, std::string* identity, int64_t timeout_ms);

}  // namespace eep::ep
