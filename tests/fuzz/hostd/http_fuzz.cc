// keeld's HTTP request reader and WebSocket frame reader over an in-memory stream.
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <string>

#include "hostd/http.h"

namespace {
class MemoryStream : public keel::hostd::Stream {
public:
  explicit MemoryStream(std::string data) : data_(std::move(data)) {}
  keel::Result<size_t> read_some(void* buf, size_t len) override {
    // Small reads exercise the reassembly paths.
    size_t n = std::min({len, data_.size() - pos_, size_t{7}});
    std::memcpy(buf, data_.data() + pos_, n);
    pos_ += n;
    return n;
  }
  keel::Result<void> write_all(const void*, size_t) override { return keel::ok(); }
  int fd() const override { return -1; }

private:
  std::string data_;
  size_t pos_ = 0;
};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace keel::hostd;
  std::string input(reinterpret_cast<const char*>(data), size);
  {
    MemoryStream s(input);
    std::string carry;
    for (int i = 0; i < 16; ++i) {
      auto r = read_request(s, carry);
      if (!r || !*r) break;
    }
  }
  {
    MemoryStream s(input);
    std::string carry;
    for (int i = 0; i < 16; ++i) {
      auto f = ws_read(s, carry, 1 << 16);
      if (!f || !*f) break;
    }
  }
  (void)parse_connect_uri(input);
  return 0;
}
