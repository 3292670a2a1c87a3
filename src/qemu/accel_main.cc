// keel-accel: prints the accelerator QEMU should use here ("kvm" or "tcg") on stdout and why on
// stderr. Scripts (the guest kit's boot test, the demo) use it so they agree with keeld.
#include <cstdio>
#include <cstring>

#include "qemu/accel.h"

int main(int argc, char** argv) {
  bool quiet = argc > 1 && std::strcmp(argv[1], "-q") == 0;
  auto choice = keel::qemu::detect_accelerator();
  if (!choice) {
    std::fprintf(stderr, "keel-accel: %s\n", choice.error().message().c_str());
    return 1;
  }
  std::printf("%s\n", std::string(keel::qemu::accel_name(choice->accel)).c_str());
  if (!quiet) std::fprintf(stderr, "accelerator: %s (%s)\n",
                           std::string(keel::qemu::accel_name(choice->accel)).c_str(),
                           choice->reason.c_str());
  return 0;
}
