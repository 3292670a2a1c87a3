// keel-fish: the shell and one-shot commands over a Guest.
#pragma once

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "guestfs/guest.h"
#include "guestfs/inspect.h"

namespace keel::guestfs {

struct FishState {
  Guest guest;
  std::vector<OsInfo> inspected;  // filled by inspect-os
  bool inspected_done = false;
  bool trace = false;             // -x: echo each command
};

struct FishCommand {
  const char* name;
  int min_args;
  int max_args;  // -1: any
  const char* usage;
  const char* help;
  Result<void> (*run)(FishState& state, const std::vector<std::string>& args);
};

const std::vector<FishCommand>& fish_commands();
const FishCommand* find_fish_command(const std::string& name);
// Runs one command line already split into words; prints errors itself and returns false on error.
bool run_fish_command(FishState& state, const std::vector<std::string>& words);
// Splits a guestfish script line into words (quotes, backslash escapes, # comments).
Result<std::vector<std::string>> split_fish_line(const std::string& line);

// Helpers shared by the one-shot forms.
Result<void> copy_out(Guest& guest, const std::string& remote, const std::string& local_dir);
Result<void> copy_in(Guest& guest, const std::string& local, const std::string& remote_dir);
Result<void> print_ls_recursive(Guest& guest, const std::string& dir, bool long_format);
void print_ll_line(const std::string& name, const FileStat& st, const std::string& link_target);

}  // namespace keel::guestfs
