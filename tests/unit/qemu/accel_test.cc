#include "qemu/accel.h"

#include <gtest/gtest.h>

namespace keel::qemu {
namespace {

TEST(Accel, KvmOnlyWithHardwareVirtualization) {
  EXPECT_EQ(choose_accelerator({true, true, ""})->accel, Accelerator::Kvm);
  // A paravirtual /dev/kvm (no vmx/svm) cannot boot Linux guests.
  EXPECT_EQ(choose_accelerator({true, false, ""})->accel, Accelerator::Tcg);
  EXPECT_EQ(choose_accelerator({false, true, ""})->accel, Accelerator::Tcg);
  EXPECT_EQ(choose_accelerator({false, false, ""})->accel, Accelerator::Tcg);
}

TEST(Accel, OverrideWinsAndIsValidated) {
  EXPECT_EQ(choose_accelerator({false, false, "kvm"})->accel, Accelerator::Kvm);
  EXPECT_EQ(choose_accelerator({true, true, "tcg"})->accel, Accelerator::Tcg);
  auto bad = choose_accelerator({true, true, "hvf"});
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message().find("expected kvm or tcg"), std::string::npos);
}

TEST(Accel, CpuinfoFlagsAreMatchedAsWholeWords) {
  EXPECT_TRUE(cpuinfo_has_hw_virt("processor\t: 0\nflags\t\t: fpu vme vmx sse\n"));
  EXPECT_TRUE(cpuinfo_has_hw_virt("flags\t\t: fpu svm\n"));
  EXPECT_FALSE(cpuinfo_has_hw_virt("flags\t\t: fpu vmxx notsvm\n"));
  EXPECT_FALSE(cpuinfo_has_hw_virt("model name\t: vmx svm\nflags\t\t: fpu\n"));
  EXPECT_EQ(accel_name(Accelerator::Kvm), "kvm");
  EXPECT_EQ(accel_name(Accelerator::Tcg), "tcg");
}

}  // namespace
}  // namespace keel::qemu
