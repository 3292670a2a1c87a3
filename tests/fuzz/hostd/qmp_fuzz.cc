// The QMP message splitter: whatever QEMU (or a compromised QEMU) sends.
#include <cstdint>
#include <string_view>

#include "qemu/qmp.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  keel::qemu::QmpMessageBuffer b;
  std::string_view in(reinterpret_cast<const char*>(data), size);
  // Feed in two pieces to cover messages split across reads.
  size_t half = size / 2;
  if (!b.append(in.substr(0, half))) return 0;
  while (true) {
    auto m = b.next();
    if (!m || !*m) break;
  }
  if (!b.append(in.substr(half))) return 0;
  while (true) {
    auto m = b.next();
    if (!m || !*m) break;
  }
  return 0;
}
