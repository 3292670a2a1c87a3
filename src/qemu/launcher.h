// Starting QEMU so that it does not depend on keeld: double fork (QEMU's parent becomes init, so a
// killed keeld leaves its VMs running), a new session, stdout/stderr to a log file, and optionally
// an unprivileged uid dropped here before exec (QEMU's own -runas would run after its seccomp
// filter, which then kills it when elevateprivileges=deny).
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "base/result.h"

namespace keel::qemu {

struct LaunchIdentity {
  uid_t uid = static_cast<uid_t>(-1);  // -1: keep keeld's
  gid_t gid = static_cast<gid_t>(-1);
};

// Looks a user up by name (getpwnam_r).
Result<LaunchIdentity> lookup_user(const std::string& name);

// Runs argv detached; returns QEMU's pid once it has exec'ed (an exec failure is an error).
Result<pid_t> launch_detached(const std::vector<std::string>& argv, const std::string& log_path,
                              const LaunchIdentity& identity);

// True if `pid` is a live (not zombie) process whose command line contains `needle`, e.g. the
// domain's UUID: keeps a recycled pid from being mistaken for our QEMU.
bool process_matches(pid_t pid, const std::string& needle);
bool process_alive(pid_t pid);
// The real uid a process runs as, or -1.
int process_uid(pid_t pid);
// Whether `identity` could read `path` (checked in a child that takes that uid: access(2) as root
// would say yes to everything).
bool readable_as(const std::string& path, const LaunchIdentity& identity);
std::string user_name(int uid);

// CPU time (user+system) of a process in nanoseconds, and its resident set in bytes.
struct ProcessUsage {
  uint64_t cpu_ns = 0;
  uint64_t rss_bytes = 0;
};
Result<ProcessUsage> process_usage(pid_t pid);

}  // namespace keel::qemu
