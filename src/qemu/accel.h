// Which accelerator QEMU should use on this host.
//
// KVM only when /dev/kvm opens read-write *and* the CPU advertises hardware virtualization (vmx or
// svm in /proc/cpuinfo). Some hosts (nested paravirtual KVM, e.g. kvm_pvm) expose a /dev/kvm on
// which an unmodified Linux guest does not boot; without vmx/svm we fall back to TCG.
// KEEL_ACCEL=kvm|tcg overrides the detection.
#pragma once

#include <string>
#include <string_view>

#include "base/result.h"

namespace keel::qemu {

enum class Accelerator { Kvm, Tcg };

struct AccelChoice {
  Accelerator accel;
  std::string reason;  // one line for the user: why this accelerator
};

std::string_view accel_name(Accelerator a);  // "kvm" / "tcg", as QEMU's -accel spells them

// Inputs of the decision, separated from the host so tests can cover every case.
struct AccelProbe {
  bool kvm_device_opens = false;
  bool cpu_has_vmx_or_svm = false;
  std::string override_value;  // KEEL_ACCEL, empty if unset
};

AccelProbe probe_host();
Result<AccelChoice> choose_accelerator(const AccelProbe& probe);
// probe_host() + choose_accelerator().
Result<AccelChoice> detect_accelerator();

// True if a /proc/cpuinfo text lists vmx or svm in a flags line.
bool cpuinfo_has_hw_virt(std::string_view cpuinfo);

}  // namespace keel::qemu
