// Fuzzes keel-switch's OpenFlow side end to end: the input is a byte stream from a controller (HELLO,
// then any messages), fed to a connection on a bridge with three in-memory ports; afterwards part of
// the input is also switched as a frame, so whatever flows and groups the stream installed run too.
#include <cstddef>
#include <cstdint>

#include "base/event_loop.h"
#include "base/log.h"
#include "switch/bridge.h"
#include "switch/memory_port.h"
#include "switch/of_connection.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel::sw;
  static auto loop = keel::EventLoop::create();
  if (!loop) return 0;
  spdlog::set_level(spdlog::level::off);
  Bridge bridge(**loop, "fuzz0", 1);
  for (int i = 1; i <= 3; ++i)
    (void)bridge.add_port("m" + std::to_string(i), "memory", std::make_unique<MemoryPort>());
  std::vector<uint8_t> out;
  {
    OfConnection conn(bridge, keel::UniqueFd(), "fuzz", nullptr);
    conn.capture = &out;
    (void)conn.start();
    conn.feed(std::span<const uint8_t>(data, size));
    // Switch a frame made of the input through whatever was installed.
    if (size >= 14) {
      PacketBatch batch;
      Frame& f = batch[0];
      size_t n = std::min<size_t>(size, 1514);
      std::copy(data + size - n, data + size, f.data);
      f.len = uint32_t(n);
      batch.set_size(1);
      if (BridgePort* p = bridge.port_by_ofport(1)) bridge.process_batch(*p, batch);
    }
  }
  return 0;
}
