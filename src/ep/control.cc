#include "ep/control.h"

#include <fmt/format.h>

namespace eep::ep {

Status SendControl(zmq::socket_t& socket, const std::string& identity, const ControlMessage& m) {
  try {
    if (!identity.empty()) socket.send(zmq::buffer(identity), zmq::send_flags::sndmore);
    const std::string h = m.header.dump();
    socket.send(zmq::buffer(h), zmq::send_flags::sndmore);
    socket.send(zmq::buffer(m.payload), zmq::send_flags::none);
  } catch (const zmq::error_t& e) {
    return Status::RemoteDisconnect(fmt::format("control send failed: {}", e.what()));
  }
  return Status::Ok();
}

Result<ControlMessage> RecvControl(zmq::socket_t& socket, std::string* identity, int64_t timeout_ms) {
  try {
    zmq::pollitem_t item{socket.handle(), 0, ZMQ_POLLIN, 0};
    if (zmq::poll(&item, 1, std::chrono::milliseconds(timeout_ms)) == 0)
      return Status::Timeout(fmt::format("no control message within {} ms", timeout_ms));
    std::vector<zmq::message_t> frames;
    do {
      frames.emplace_back();
      if (!socket.recv(frames.back(), zmq::recv_flags::none)) return Status::Timeout("control receive interrupted");
    } while (frames.back().more());
    size_t first = 0;
    if (identity != nullptr) {
      if (frames.empty()) return Status::Corruption("control message without identity");
      *identity = frames[0].to_string();
      first = 1;
    }
    if (frames.size() != first + 2)
      return Status::Corruption(fmt::format("control message with {} frames", frames.size()));
    ControlMessage m;
    m.header = nlohmann::json::parse(frames[first].to_string_view());
    m.payload = frames[first + 1].to_string();
    return m;
  } catch (const zmq::error_t& e) {
    return Status::RemoteDisconnect(fmt::format("control receive failed: {}", e.what()));
  } catch (const nlohmann::json::exception& e) {
    return Status::Corruption(fmt::format("control message header is not JSON: {}", e.what()));
  }
}

}  // namespace eep::ep
