#include "qemu/accel.h"

#include <fcntl.h>

#include <cstdlib>

#include "base/unique_fd.h"

namespace keel::qemu {

std::string_view accel_name(Accelerator a) { return a == Accelerator::Kvm ? "kvm" : "tcg"; }

bool cpuinfo_has_hw_virt(std::string_view cpuinfo) {
  size_t pos = 0;
  while (pos < cpuinfo.size()) {
    size_t end = cpuinfo.find('\n', pos);
    if (end == std::string_view::npos) end = cpuinfo.size();
    std::string_view line = cpuinfo.substr(pos, end - pos);
    pos = end + 1;
    if (line.substr(0, 5) != "flags") continue;
    auto colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    std::string_view flags = line.substr(colon + 1);
    // Whole words only: "vmx" must not match inside another flag name.
    size_t i = 0;
    while (i < flags.size()) {
      while (i < flags.size() && flags[i] == ' ') ++i;
      size_t j = i;
      while (j < flags.size() && flags[j] != ' ') ++j;
      std::string_view word = flags.substr(i, j - i);
      if (word == "vmx" || word == "svm") return true;
      i = j;
    }
  }
  return false;
}

AccelProbe probe_host() {
  AccelProbe probe;
  probe.kvm_device_opens = UniqueFd::open("/dev/kvm", O_RDWR).has_value();
  if (auto cpuinfo = read_file("/proc/cpuinfo")) probe.cpu_has_vmx_or_svm = cpuinfo_has_hw_virt(*cpuinfo);
  if (const char* env = std::getenv("KEEL_ACCEL")) probe.override_value = env;
  return probe;
}

Result<AccelChoice> choose_accelerator(const AccelProbe& probe) {
  if (!probe.override_value.empty()) {
    if (probe.override_value == "kvm") return AccelChoice{Accelerator::Kvm, "KEEL_ACCEL=kvm"};
    if (probe.override_value == "tcg") return AccelChoice{Accelerator::Tcg, "KEEL_ACCEL=tcg"};
    return fail_invalid("KEEL_ACCEL='{}': expected kvm or tcg", probe.override_value);
  }
  if (probe.kvm_device_opens && probe.cpu_has_vmx_or_svm)
    return AccelChoice{Accelerator::Kvm, "/dev/kvm opens and the CPU has hardware virtualization"};
  if (probe.kvm_device_opens)
    return AccelChoice{Accelerator::Tcg,
                       "/dev/kvm opens but the CPU has no vmx/svm (paravirtual KVM cannot boot "
                       "Linux guests); using TCG"};
  return AccelChoice{Accelerator::Tcg, "/dev/kvm is not available; using TCG"};
}

Result<AccelChoice> detect_accelerator() { return choose_accelerator(probe_host()); }

}  // namespace keel::qemu
