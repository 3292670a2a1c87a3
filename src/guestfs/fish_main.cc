// keel-fish: guestfish's commands and virt-tools' one-shot forms, straight on image files.
//
//   keel-fish [--ro|--rw] -a IMAGE [-a IMAGE..] [-i | -m DEV[:MOUNTPOINT]..] [CMD ARGS : CMD ARGS ..]
//       no commands: an interactive shell on a terminal, else a script read from stdin
//   keel-fish ls -a IMAGE [-R] [-l] DIR..            (virt-ls)
//   keel-fish cat -a IMAGE PATH..                    (virt-cat)
//   keel-fish copy-out -a IMAGE REMOTE.. LOCALDIR    (virt-copy-out)
//   keel-fish copy-in -a IMAGE LOCAL.. REMOTEDIR     (virt-copy-in)
//   keel-fish inspect -a IMAGE [--output xml|json]   (virt-inspector)
//   keel-fish filesystems -a IMAGE [--all] [--long]  (virt-filesystems)
//   keel-fish df -a IMAGE [-h]                       (virt-df)
//   keel-fish sysprep -a IMAGE [--operations ..] [--hostname H] [--root-password password:P]
//                                                    (virt-sysprep)
#include <unistd.h>

#include <editline/readline.h>

#include <cstdio>
#include <cstring>
#include <iostream>
#include <set>

#include "base/size.h"
#include "base/unique_fd.h"
#include "guestfs/fish.h"
#include "guestfs/inspect.h"
#include "guestfs/open_disk.h"
#include "guestfs/sysprep.h"
#include "guestfs/util.h"

using namespace keel;
using namespace keel::guestfs;

namespace {

struct MountSpec {
  std::string device;
  std::string mountpoint = "/";
};

struct Options {
  std::string verb;  // "" for guestfish mode
  std::vector<std::string> images;
  std::string format;
  std::optional<bool> read_only;  // --ro / --rw
  bool inspect = false;           // -i
  std::vector<MountSpec> mounts;  // -m
  bool recursive = false, long_format = false, human = false, all = false, trace = false;
  bool list_operations = false, dry_run = false, quiet = false;
  std::string output = "xml";
  std::vector<std::string> operations;
  std::optional<std::string> hostname, root_password;
  std::vector<std::string> filesystems_kinds;  // --parts --filesystems --lvs --vgs --pvs
  std::vector<std::string> rest;               // positional arguments / commands
};

[[noreturn]] void usage_error(const std::string& message) {
  fprintf(stderr, "keel-fish: %s\nTry 'keel-fish --help'.\n", message.c_str());
  exit(1);
}

void print_help() {
  puts(
      "keel-fish: read and edit the files of virtual machine images, without booting anything.\n"
      "\n"
      "  keel-fish [--ro|--rw] -a IMAGE [-a IMAGE..] [-i | -m DEV[:MOUNTPOINT]..] [CMD ARGS : CMD ARGS ..]\n"
      "      With no commands: an interactive shell on a terminal, or a script read from stdin.\n"
      "  keel-fish ls -a IMAGE [-R] [-l] DIR..               (like virt-ls)\n"
      "  keel-fish cat -a IMAGE PATH..                       (like virt-cat)\n"
      "  keel-fish copy-out -a IMAGE REMOTE.. LOCALDIR       (like virt-copy-out)\n"
      "  keel-fish copy-in -a IMAGE LOCAL.. REMOTEDIR        (like virt-copy-in)\n"
      "  keel-fish inspect -a IMAGE [--output xml|json]     (like virt-inspector)\n"
      "  keel-fish filesystems -a IMAGE [--all] [--long] [--parts|--lvs|--vgs|--pvs]\n"
      "  keel-fish df -a IMAGE [-h]                          (like virt-df)\n"
      "  keel-fish sysprep -a IMAGE [--operations OP,..] [--list-operations] [--hostname NAME]\n"
      "                    [--root-password password:PW|file:PATH] [--dry-run]\n"
      "\n"
      "Images are opened read-write in the shell unless --ro is given, and read-only in the one-shot\n"
      "forms that only read. A writer takes a lock on the image: an image in use by QEMU or another\n"
      "keel-fish is opened read-only (or, with --rw, refused).\n"
      "Inside the shell, 'help' lists the commands.");
}

const std::set<std::string> kVerbs = {"ls", "cat", "copy-out", "copy-in", "inspect", "filesystems", "df", "sysprep"};

Options parse_args(int argc, char** argv) {
  Options o;
  int i = 1;
  if (argc > 1 && kVerbs.count(argv[1])) {
    o.verb = argv[1];
    i = 2;
  }
  auto need = [&](const std::string& flag) -> std::string {
    if (i + 1 >= argc) usage_error(flag + " needs an argument");
    return argv[++i];
  };
  bool commands_started = false;
  for (; i < argc; i++) {
    std::string a = argv[i];
    if (commands_started || a.empty() || a[0] != '-' || a == "-") {
      if (o.verb.empty()) commands_started = true;
      o.rest.push_back(a);
      continue;
    }
    std::string value;
    size_t eq = a.find('=');
    bool has_value = a.rfind("--", 0) == 0 && eq != std::string::npos;
    if (has_value) {
      value = a.substr(eq + 1);
      a = a.substr(0, eq);
    }
    auto arg = [&]() { return has_value ? value : need(a); };
    if (a == "-a" || a == "--add") o.images.push_back(arg());
    else if (a == "--format") o.format = arg();
    else if (a == "--ro" || a == "-r") o.read_only = true;
    else if (a == "--rw" || a == "-w") o.read_only = false;
    else if (a == "-i" || a == "--inspector") o.inspect = true;
    else if (a == "-m" || a == "--mount") {
      std::string spec = arg();
      MountSpec m;
      size_t colon = spec.find(':');
      m.device = spec.substr(0, colon);
      if (colon != std::string::npos) {
        std::string mp = spec.substr(colon + 1);
        m.mountpoint = mp.substr(0, mp.find(':'));
      }
      o.mounts.push_back(m);
    } else if (a == "-R" || a == "--recursive") o.recursive = true;
    else if (a == "-l" || a == "--long") o.long_format = true;
    else if (a == "-lR" || a == "-Rl") o.long_format = o.recursive = true;
    else if (a == "-h" || a == "--human-readable") {
      if (o.verb.empty()) {
        print_help();
        exit(0);
      }
      o.human = true;
    } else if (a == "--help") {
      print_help();
      exit(0);
    } else if (a == "--all") o.all = true;
    else if (a == "--parts" || a == "--filesystems" || a == "--lvs" || a == "--vgs" || a == "--pvs" ||
             a == "--partitions" || a == "--logical-volumes" || a == "--volume-groups" || a == "--physical-volumes")
      o.filesystems_kinds.push_back(a);
    else if (a == "-x") o.trace = true;
    else if (a == "-q" || a == "--quiet") o.quiet = true;
    else if (a == "-v" || a == "--verbose" || a == "-V") continue;
    else if (a == "--output" || a == "-o") o.output = arg();
    else if (a == "--operations" || a == "--operation" || a == "--enable") {
      std::string list = arg();
      size_t p = 0;
      while (p <= list.size()) {
        size_t c = list.find(',', p);
        if (c == std::string::npos) c = list.size();
        if (c > p) o.operations.push_back(list.substr(p, c - p));
        p = c + 1;
      }
    } else if (a == "--list-operations") o.list_operations = true;
    else if (a == "--dry-run" || a == "-n") o.dry_run = true;
    else if (a == "--hostname") o.hostname = arg();
    else if (a == "--root-password") {
      std::string spec = arg();
      if (spec.rfind("password:", 0) == 0) {
        o.root_password = spec.substr(9);
      } else if (spec.rfind("file:", 0) == 0) {
        auto content = read_file(spec.substr(5));
        if (!content) usage_error(content.error().message());
        std::string pw = *content;
        o.root_password = pw.substr(0, pw.find('\n'));
      } else {
        usage_error("--root-password takes password:PASSWORD or file:FILENAME");
      }
    } else if (a == "--") {
      commands_started = true;
    } else {
      usage_error("unknown option " + a);
    }
  }
  return o;
}

// Opens the images, reads their structure and mounts what the options ask for.
Result<void> setup(FishState& st, const Options& o, bool one_shot_read_only, bool auto_mount) {
  if (o.images.empty()) return fail_invalid("no image given (use -a IMAGE)");
  LockPolicy policy = LockPolicy::PreferReadWrite;
  if (o.read_only.has_value()) policy = *o.read_only ? LockPolicy::ReadOnly : LockPolicy::ReadWrite;
  else if (one_shot_read_only) policy = LockPolicy::ReadOnly;
  static std::vector<UniqueFd> locks;  // held until exit
  for (const auto& image : o.images) {
    auto opened = TRY(open_disk(image, policy, o.format));
    if (!opened.note.empty() && !o.quiet) fprintf(stderr, "keel-fish: warning: %s\n", opened.note.c_str());
    locks.push_back(std::move(opened.lock));
    st.guest.add_drive(std::move(opened.device), opened.read_only);
  }
  TRY(st.guest.launch());
  bool ro = st.guest.read_only();
  if (!o.mounts.empty()) {
    for (const auto& m : o.mounts) TRY(st.guest.mount(m.device, m.mountpoint, ro));
    return ok();
  }
  if (o.inspect || auto_mount) {
    auto roots = TRY(inspect_os(st.guest));
    st.inspected = roots;
    st.inspected_done = true;
    if (roots.size() == 1) return mount_os(st.guest, roots[0], ro);
    if (roots.size() > 1) return fail_invalid("several operating systems found; choose one with -m");
    if (o.inspect) return fail_invalid("no operating system found in the image (use -m DEVICE to mount by hand)");
    // Not an OS disk: mount the only filesystem there is, as virt-ls would need -m for.
    std::vector<std::string> mountable;
    for (const auto& [dev, type] : st.guest.list_filesystems())
      if (type.rfind("ext", 0) == 0 || type == "vfat") mountable.push_back(dev);
    if (mountable.size() == 1) return st.guest.mount(mountable[0], "/", ro);
    return fail_invalid("no operating system found and {} filesystems; use -m DEVICE[:MOUNTPOINT]",
                        mountable.size());
  }
  return ok();
}

// ---- the shell -------------------------------------------------------------------------------------

FishState* g_state = nullptr;

char* command_generator(const char* text, int state) {
  static size_t index;
  if (state == 0) index = 0;
  const auto& cmds = fish_commands();
  size_t len = strlen(text);
  while (index < cmds.size()) {
    const char* name = cmds[index++].name;
    if (strncmp(name, text, len) == 0) return strdup(name);
  }
  return nullptr;
}

char* path_generator(const char* text, int state) {
  static std::vector<std::string> matches;
  static size_t index;
  if (state == 0) {
    matches.clear();
    index = 0;
    std::string t = text;
    size_t slash = t.rfind('/');
    std::string dir = slash == 0 ? "/" : t.substr(0, slash);
    std::string prefix = t.substr(slash + 1);
    if (g_state) {
      if (auto entries = g_state->guest.readdir(dir.empty() ? "/" : dir)) {
        for (const auto& e : *entries) {
          if (e.name.rfind(prefix, 0) != 0) continue;
          std::string full = (dir == "/" ? "" : dir) + "/" + e.name;
          if (e.type == FileType::Directory) full += "/";
          matches.push_back(full);
        }
      }
    }
  }
  if (index < matches.size()) return strdup(matches[index++].c_str());
  return nullptr;
}

char** fish_completion(const char* text, int start, int) {
  rl_attempted_completion_over = 1;
  if (start == 0) return rl_completion_matches(text, command_generator);
  if (text[0] == '/') {
    rl_completion_append_character = '\0';
    return rl_completion_matches(text, path_generator);
  }
  return nullptr;
}

// Splits the command-line commands at ':' words.
std::vector<std::vector<std::string>> split_commands(const std::vector<std::string>& words) {
  std::vector<std::vector<std::string>> cmds(1);
  for (const auto& w : words) {
    if (w == ":") {
      cmds.emplace_back();
    } else {
      cmds.back().push_back(w);
    }
  }
  return cmds;
}

int run_script(FishState& st, std::istream& in) {
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line[0] == '!') continue;  // local shell commands are not run
    auto words = split_fish_line(line);
    if (!words) {
      fprintf(stderr, "keel-fish: %s\n", words.error().message().c_str());
      return 1;
    }
    if (words->empty()) continue;
    if ((*words)[0] == "exit" || (*words)[0] == "quit") break;
    if (!run_fish_command(st, *words)) return 1;
  }
  return 0;
}

int run_shell(FishState& st) {
  g_state = &st;
  rl_attempted_completion_function = fish_completion;
  std::string history_path;
  if (const char* home = getenv("HOME")) {
    history_path = std::string(home) + "/.keel-fish_history";
    read_history(history_path.c_str());
  }
  printf("Welcome to keel-fish, the guest filesystem shell.\nType 'help' for a list of commands, 'exit' to leave.\n\n");
  int status = 0;
  while (true) {
    fflush(stdout);
    char* raw = readline("><fs> ");
    if (!raw) {
      printf("\n");
      break;
    }
    std::string line = raw;
    free(raw);
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    add_history(line.c_str());
    auto words = split_fish_line(line);
    if (!words) {
      fprintf(stderr, "keel-fish: %s\n", words.error().message().c_str());
      continue;
    }
    if (words->empty()) continue;
    if ((*words)[0] == "exit" || (*words)[0] == "quit") break;
    status = run_fish_command(st, *words) ? 0 : 1;
  }
  if (!history_path.empty()) write_history(history_path.c_str());
  return status;
}

// ---- one-shot forms --------------------------------------------------------------------------------

int fail_with(const Error& e) {
  fflush(stdout);
  fprintf(stderr, "keel-fish: %s\n", e.message().c_str());
  return 1;
}

int run_verb(FishState& st, const Options& o) {
  const std::string& v = o.verb;
  if (v == "sysprep" && o.list_operations) {
    for (const auto& op : sysprep_operations())
      printf("%s %s %s\n", op.name.c_str(), op.enabled_by_default ? "*" : " ", op.description.c_str());
    return 0;
  }
  bool writes = v == "copy-in" || v == "sysprep";
  bool needs_mount = v != "filesystems" && v != "inspect";
  if (auto r = setup(st, o, !writes, needs_mount); !r) return fail_with(r.error());
  if (writes && st.guest.read_only()) return fail_with(Error(EROFS, "the image is open read-only; cannot " + v));
  if (v == "ls") {
    std::vector<std::string> dirs = o.rest.empty() ? std::vector<std::string>{"/"} : o.rest;
    for (const auto& d : dirs) {
      Result<void> r;
      if (o.recursive) {
        r = print_ls_recursive(st.guest, d, o.long_format);
      } else if (o.long_format) {
        r = ok();
        auto entries = st.guest.readdir(d);
        if (!entries) return fail_with(entries.error());
        for (const auto& e : *entries) {
          std::string path = join_path(d, e.name);
          auto s = st.guest.lstat(path);
          if (!s) return fail_with(s.error());
          std::string link = s->type() == FileType::Symlink ? st.guest.readlink(path).value_or("") : "";
          print_ll_line(e.name, *s, link);
        }
      } else {
        auto entries = st.guest.readdir(d);
        if (!entries) return fail_with(entries.error());
        std::string buffer;
        for (const auto& e : *entries) buffer += e.name + "\n";
        fwrite(buffer.data(), 1, buffer.size(), stdout);
      }
      if (!r) return fail_with(r.error());
    }
    return 0;
  }
  if (v == "cat") {
    if (o.rest.empty()) usage_error("cat: which file?");
    for (const auto& p : o.rest) {
      auto r = st.guest.read_stream(p, 0, UINT64_MAX, [](std::span<const uint8_t> c) -> Result<void> {
        fwrite(c.data(), 1, c.size(), stdout);
        return ok();
      });
      if (!r) return fail_with(r.error());
    }
    return 0;
  }
  if (v == "copy-out" || v == "copy-in") {
    if (o.rest.size() < 2) usage_error(v + ": needs a source and a destination directory");
    std::vector<std::string> words = {v};
    words.insert(words.end(), o.rest.begin(), o.rest.end());
    bool good = run_fish_command(st, words);
    if (good && v == "copy-in") {
      if (auto r = st.guest.sync(); !r) return fail_with(r.error());
    }
    return good ? 0 : 1;
  }
  if (v == "inspect") {
    if (st.inspected.empty()) {
      auto roots = inspect_os(st.guest);
      if (!roots) return fail_with(roots.error());
      st.inspected = *roots;
    }
    if (st.inspected.empty()) return fail_with(Error(ENOENT, "no operating system found in the image"));
    nlohmann::json all = nlohmann::json::array();
    std::string xml;
    for (auto& os : st.inspected) {
      if (auto r = mount_os(st.guest, os, true); !r) return fail_with(r.error());
      (void)inspect_mounted(st.guest, os);
      auto apps = list_applications(st.guest, os);
      if (!apps && !o.quiet) fprintf(stderr, "keel-fish: warning: %s\n", apps.error().message().c_str());
      auto kernels = list_kernels(st.guest);
      std::vector<Application> no_apps;
      std::vector<std::string> no_kernels;
      if (o.output == "json") {
        all.push_back(os_to_json(os, apps ? &*apps : &no_apps, kernels ? &*kernels : &no_kernels));
      } else {
        std::string one = os_to_xml(os, apps ? &*apps : &no_apps);
        if (xml.empty()) {
          xml = one;
        } else {
          // Merge the <operatingsystem> elements into one document.
          size_t start = one.find("  <operatingsystem>");
          size_t end = one.find("</operatingsystems>");
          xml.insert(xml.find("</operatingsystems>"), one.substr(start, end - start));
        }
      }
      st.guest.umount_all();
    }
    if (o.output == "json") {
      std::string s = all.dump(2);
      printf("%s\n", s.c_str());
    } else if (o.output == "xml") {
      fputs(xml.c_str(), stdout);
    } else {
      usage_error("--output takes xml or json");
    }
    return 0;
  }
  if (v == "filesystems") {
    std::set<std::string> kinds(o.filesystems_kinds.begin(), o.filesystems_kinds.end());
    bool want_fs = kinds.empty() || kinds.count("--filesystems") || o.all;
    bool want_parts = kinds.count("--parts") || kinds.count("--partitions") || o.all;
    bool want_lvs = kinds.count("--lvs") || kinds.count("--logical-volumes") || o.all;
    bool want_vgs = kinds.count("--vgs") || kinds.count("--volume-groups") || o.all;
    bool want_pvs = kinds.count("--pvs") || kinds.count("--physical-volumes") || o.all;
    if (o.long_format) printf("%-24s %-12s %-10s %-14s %s\n", "Name", "Type", "VFS", "Size", "Label");
    auto line = [&](const std::string& name, const std::string& type, const std::string& vfs, uint64_t size,
                    const std::string& label) {
      if (o.long_format)
        printf("%-24s %-12s %-10s %-14s %s\n", name.c_str(), type.c_str(), vfs.c_str(),
               o.human ? format_size(size).c_str() : std::to_string(size).c_str(), label.empty() ? "-" : label.c_str());
      else
        printf("%s\n", name.c_str());
    };
    for (const auto& d : st.guest.devices()) {
      bool is_fs = !d.probe.type.empty() && d.probe.type != "LVM2_member";
      if (want_fs && is_fs && (d.probe.type != "swap" || o.all))
        line(d.name, "filesystem", d.probe.type, d.device->size(), d.probe.label);
      if (want_parts && d.kind == DeviceKind::Partition) line(d.name, "partition", "", d.device->size(), "");
      if (want_lvs && d.kind == DeviceKind::LogicalVolume) line(d.name, "lv", "", d.device->size(), "");
      if (want_pvs && d.probe.type == "LVM2_member") line(d.name, "pv", "", d.device->size(), "");
      if (o.all && d.kind == DeviceKind::Disk) line(d.name, "device", "", d.device->size(), "");
    }
    if (want_vgs)
      for (const auto& vg : st.guest.list_volume_groups()) line("/dev/" + vg, "vg", "", 0, "");
    return 0;
  }
  if (v == "df") {
    return run_fish_command(st, {o.human ? "df-h" : "df"}) ? 0 : 1;
  }
  if (v == "sysprep") {
    SysprepOptions so;
    so.hostname = o.hostname;
    so.root_password = o.root_password;
    so.operations = o.operations;
    so.dry_run = o.dry_run;
    auto r = run_sysprep(st.guest, so, [&](const std::string& line) {
      if (!o.quiet) printf("[sysprep] %s\n", line.c_str());
    });
    if (!r) return fail_with(r.error());
    return 0;
  }
  usage_error("unknown command " + v);
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse_args(argc, argv);
  static char stdout_buffer[1 << 16];
  setvbuf(stdout, stdout_buffer, _IOFBF, sizeof stdout_buffer);
  int status = 0;
  {
    FishState st;
    st.trace = o.trace;
    if (!o.verb.empty()) {
      status = run_verb(st, o);
    } else {
      if (o.images.empty()) {
        print_help();
        return 1;
      }
      if (auto r = setup(st, o, false, false); !r) return fail_with(r.error());
      if (!o.rest.empty()) {
        for (const auto& cmd : split_commands(o.rest)) {
          if (cmd.empty()) continue;
          if (!run_fish_command(st, cmd)) {
            status = 1;
            break;
          }
        }
      } else if (isatty(STDIN_FILENO)) {
        status = run_shell(st);
      } else {
        status = run_script(st, std::cin);
      }
      if (auto r = st.guest.sync(); !r) status = fail_with(r.error());
    }
    fflush(stdout);
  }
  return status;
}
