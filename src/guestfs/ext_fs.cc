#include "guestfs/ext_fs.h"

#include <ctime>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

// com_err.h has no C++ guards of its own.
extern "C" {
#include <et/com_err.h>
}
#include <ext2fs/ext2fs.h>

#include "guestfs/util.h"

namespace keel::guestfs {

namespace {

// ---- io_manager over a BlockDevice -------------------------------------------------------------
// libext2fs opens a channel by name; ours is "keel-blockdev:<pointer>", made only by this file.

constexpr const char* kChannelPrefix = "keel-blockdev:";

// libext2fs re-reads the same inode-table and directory blocks many times (its own inode cache
// holds a handful): single-block reads are cached here, up to kCacheBlocks, and writes keep the
// cache current.
constexpr size_t kCacheBlocks = 8192;

struct ChannelState {
  disk::BlockDevice* device = nullptr;
  std::unordered_map<uint64_t, std::vector<uint8_t>> cache;

  void forget(uint64_t first_block, uint64_t blocks) {
    if (cache.empty()) return;
    if (blocks > cache.size()) {
      for (auto it = cache.begin(); it != cache.end();)
        it = (it->first >= first_block && it->first - first_block < blocks) ? cache.erase(it) : std::next(it);
      return;
    }
    for (uint64_t b = 0; b < blocks; b++) cache.erase(first_block + b);
  }
};

errcode_t keel_io_open(const char* name, int flags, io_channel* out);
errcode_t keel_io_close(io_channel channel);
errcode_t keel_io_set_blksize(io_channel channel, int blksize);
errcode_t keel_io_read_blk64(io_channel channel, unsigned long long block, int count, void* data);
errcode_t keel_io_write_blk64(io_channel channel, unsigned long long block, int count, const void* data);
errcode_t keel_io_read_blk(io_channel channel, unsigned long block, int count, void* data) {
  return keel_io_read_blk64(channel, block, count, data);
}
errcode_t keel_io_write_blk(io_channel channel, unsigned long block, int count, const void* data) {
  return keel_io_write_blk64(channel, block, count, data);
}
errcode_t keel_io_flush(io_channel channel);
errcode_t keel_io_write_byte(io_channel channel, unsigned long offset, int count, const void* data);
errcode_t keel_io_set_option(io_channel, const char*, const char*) { return EXT2_ET_INVALID_ARGUMENT; }
errcode_t keel_io_discard(io_channel channel, unsigned long long block, unsigned long long count);
errcode_t keel_io_zeroout(io_channel channel, unsigned long long block, unsigned long long count);

struct struct_io_manager keel_io_manager_struct = [] {
  struct struct_io_manager m;
  std::memset(&m, 0, sizeof m);
  m.magic = EXT2_ET_MAGIC_IO_MANAGER;
  m.name = "keel BlockDevice I/O manager";
  m.open = keel_io_open;
  m.close = keel_io_close;
  m.set_blksize = keel_io_set_blksize;
  m.read_blk = keel_io_read_blk;
  m.write_blk = keel_io_write_blk;
  m.flush = keel_io_flush;
  m.write_byte = keel_io_write_byte;
  m.set_option = keel_io_set_option;
  m.read_blk64 = keel_io_read_blk64;
  m.write_blk64 = keel_io_write_blk64;
  m.discard = keel_io_discard;
  m.zeroout = keel_io_zeroout;
  return m;
}();

ChannelState* state_of(io_channel channel) { return static_cast<ChannelState*>(channel->private_data); }

errcode_t keel_io_open(const char* name, int flags, io_channel* out) {
  if (!name || std::strncmp(name, kChannelPrefix, std::strlen(kChannelPrefix)) != 0) return EXT2_ET_BAD_DEVICE_NAME;
  void* pointer = nullptr;
  if (std::sscanf(name + std::strlen(kChannelPrefix), "%p", &pointer) != 1 || !pointer)
    return EXT2_ET_BAD_DEVICE_NAME;
  auto* channel = static_cast<io_channel>(std::calloc(1, sizeof(struct struct_io_channel)));
  auto* state = new ChannelState();
  state->device = static_cast<disk::BlockDevice*>(pointer);
  char* channel_name = static_cast<char*>(std::malloc(std::strlen(name) + 1));
  if (!channel || !channel_name) {
    std::free(channel);
    std::free(channel_name);
    delete state;
    return EXT2_ET_NO_MEMORY;
  }
  std::strcpy(channel_name, name);
  channel->magic = EXT2_ET_MAGIC_IO_CHANNEL;
  channel->manager = &keel_io_manager_struct;
  channel->name = channel_name;
  channel->block_size = 1024;
  channel->refcount = 1;
  (void)flags;
  channel->private_data = state;
  *out = channel;
  return 0;
}

errcode_t keel_io_close(io_channel channel) {
  if (--channel->refcount > 0) return 0;
  delete state_of(channel);
  std::free(channel->name);
  std::free(channel);
  return 0;
}

errcode_t keel_io_set_blksize(io_channel channel, int blksize) {
  if (channel->block_size != blksize) state_of(channel)->cache.clear();
  channel->block_size = blksize;
  return 0;
}

uint64_t byte_count(io_channel channel, int count) {
  return count < 0 ? uint64_t(-int64_t(count)) : uint64_t(count) * uint64_t(channel->block_size);
}

errcode_t keel_io_read_blk64(io_channel channel, unsigned long long block, int count, void* data) {
  uint64_t length = byte_count(channel, count);
  uint64_t offset = block * uint64_t(channel->block_size);
  auto* state = state_of(channel);
  auto* device = state->device;
  if (offset > device->size() || length > device->size() - offset) return EXT2_ET_SHORT_READ;
  bool one_block = count == 1;
  if (one_block) {
    auto it = state->cache.find(block);
    if (it != state->cache.end()) {
      std::memcpy(data, it->second.data(), length);
      return 0;
    }
  }
  auto r = device->read(offset, std::span<uint8_t>(static_cast<uint8_t*>(data), length));
  if (!r) return EXT2_ET_SHORT_READ;
  if (one_block) {
    if (state->cache.size() >= kCacheBlocks) state->cache.clear();
    state->cache.emplace(block, std::vector<uint8_t>(static_cast<uint8_t*>(data), static_cast<uint8_t*>(data) + length));
  }
  return 0;
}

errcode_t keel_io_write_blk64(io_channel channel, unsigned long long block, int count, const void* data) {
  uint64_t length = byte_count(channel, count);
  uint64_t offset = block * uint64_t(channel->block_size);
  auto* device = state_of(channel)->device;
  if (device->read_only()) return EXT2_ET_RO_FILSYS;
  if (offset > device->size() || length > device->size() - offset) return EXT2_ET_SHORT_WRITE;
  state_of(channel)->forget(block, (length + channel->block_size - 1) / channel->block_size);
  auto r = device->write(offset, std::span<const uint8_t>(static_cast<const uint8_t*>(data), length));
  return r ? 0 : EXT2_ET_SHORT_WRITE;
}

errcode_t keel_io_write_byte(io_channel channel, unsigned long offset, int count, const void* data) {
  auto* device = state_of(channel)->device;
  if (count < 0 || offset > device->size() || uint64_t(count) > device->size() - offset) return EXT2_ET_SHORT_WRITE;
  uint64_t bs = uint64_t(channel->block_size);
  state_of(channel)->forget(offset / bs, (offset % bs + uint64_t(count) + bs - 1) / bs);
  auto r = device->write(offset, std::span<const uint8_t>(static_cast<const uint8_t*>(data), size_t(count)));
  return r ? 0 : EXT2_ET_SHORT_WRITE;
}

errcode_t keel_io_flush(io_channel channel) {
  auto* device = state_of(channel)->device;
  if (device->read_only()) return 0;
  return device->flush() ? 0 : EXT2_ET_SHORT_WRITE;
}

errcode_t keel_io_discard(io_channel channel, unsigned long long block, unsigned long long count) {
  auto* device = state_of(channel)->device;
  state_of(channel)->forget(block, count);
  auto r = device->discard(block * channel->block_size, count * channel->block_size);
  return r ? 0 : EXT2_ET_UNIMPLEMENTED;
}

errcode_t keel_io_zeroout(io_channel channel, unsigned long long block, unsigned long long count) {
  auto* device = state_of(channel)->device;
  uint64_t offset = block * channel->block_size, length = count * channel->block_size;
  if (offset > device->size() || length > device->size() - offset) return EXT2_ET_SHORT_WRITE;
  state_of(channel)->forget(block, count);
  auto r = device->write_zeroes(offset, length);
  return r ? 0 : EXT2_ET_SHORT_WRITE;
}

// ---- the filesystem ------------------------------------------------------------------------------

tl::unexpected<Error> ext_error(errcode_t code, std::string_view what) {
  int errno_code = EIO;
  switch (code) {
    case EXT2_ET_FILE_NOT_FOUND: errno_code = ENOENT; break;
    case EXT2_ET_DIR_EXISTS: errno_code = EEXIST; break;
    case EXT2_ET_RO_FILSYS: errno_code = EROFS; break;
    case EXT2_ET_NO_DIRECTORY: errno_code = ENOTDIR; break;
    case EXT2_ET_BLOCK_ALLOC_FAIL:
    case EXT2_ET_INODE_ALLOC_FAIL: errno_code = ENOSPC; break;
    default: break;
  }
  if (code > 0 && code < 4096) errno_code = int(code);
  return fail(errno_code, fmt::format("{}: {}", what, error_message(code)));
}

FileType type_of_mode(uint32_t mode) {
  switch (mode & 0170000) {
    case 0100000: return FileType::Regular;
    case 0040000: return FileType::Directory;
    case 0120000: return FileType::Symlink;
    case 0020000: return FileType::CharDevice;
    case 0060000: return FileType::BlockDevice;
    case 0010000: return FileType::Fifo;
    case 0140000: return FileType::Socket;
    default: return FileType::Unknown;
  }
}

int ext_file_type(uint32_t mode) {
  switch (type_of_mode(mode)) {
    case FileType::Regular: return EXT2_FT_REG_FILE;
    case FileType::Directory: return EXT2_FT_DIR;
    case FileType::Symlink: return EXT2_FT_SYMLINK;
    case FileType::CharDevice: return EXT2_FT_CHRDEV;
    case FileType::BlockDevice: return EXT2_FT_BLKDEV;
    case FileType::Fifo: return EXT2_FT_FIFO;
    case FileType::Socket: return EXT2_FT_SOCK;
    default: return EXT2_FT_UNKNOWN;
  }
}

class ExtFilesystem final : public Filesystem {
public:
  ExtFilesystem(ext2_filsys fs, bool read_only) : fs_(fs), read_only_(read_only) {}
  ~ExtFilesystem() override {
    if (fs_) {
      if (!read_only_) (void)sync();
      ext2fs_close_free(&fs_);
    }
  }

  std::string type() const override {
    auto* sb = fs_->super;
    uint32_t ext3_incompat = EXT2_FEATURE_INCOMPAT_FILETYPE | EXT3_FEATURE_INCOMPAT_RECOVER |
                             EXT2_FEATURE_INCOMPAT_META_BG;
    uint32_t ext3_ro = EXT2_FEATURE_RO_COMPAT_SPARSE_SUPER | EXT2_FEATURE_RO_COMPAT_LARGE_FILE |
                       0x0004 /* btree_dir */;
    if ((sb->s_feature_incompat & ~ext3_incompat) || (sb->s_feature_ro_compat & ~ext3_ro)) return "ext4";
    if (ext2fs_has_feature_journal(sb)) return "ext3";
    return "ext2";
  }
  bool read_only() const override { return read_only_; }

  Result<FileStat> lstat(const std::string& path) override {
    ext2_ino_t ino = TRY(lookup(path));
    struct ext2_inode_large inode;
    TRY(read_inode(ino, inode, path));
    FileStat st;
    st.ino = ino;
    st.mode = inode.i_mode;
    st.nlink = inode.i_links_count;
    st.uid = owner_uid(*reinterpret_cast<ext2_inode*>(&inode));
    st.gid = owner_gid(*reinterpret_cast<ext2_inode*>(&inode));
    st.size = EXT2_I_SIZE(&inode);
    st.blocks = ext2fs_get_stat_i_blocks(fs_, EXT2_INODE(&inode));
    st.blksize = fs_->blocksize;
    st.atime = inode.i_atime;
    st.mtime = inode.i_mtime;
    st.ctime = inode.i_ctime;
    FileType t = type_of_mode(inode.i_mode);
    if (t == FileType::CharDevice || t == FileType::BlockDevice) {
      if (inode.i_block[0]) {
        st.rdev = ((inode.i_block[0] >> 8) & 255) << 8 | (inode.i_block[0] & 255);
      } else {
        uint32_t dev = inode.i_block[1];
        uint32_t major = (dev & 0xfff00) >> 8, minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
        st.rdev = (uint64_t(major) << 8) | minor;
      }
    }
    return st;
  }

  Result<std::vector<DirEntry>> readdir(const std::string& path) override {
    ext2_ino_t ino = TRY(lookup(path));
    struct Ctx {
      std::vector<DirEntry> entries;
      bool has_filetype;
    } ctx{{}, bool(ext2fs_has_feature_filetype(fs_->super))};
    auto callback = [](ext2_ino_t, int, struct ext2_dir_entry* dirent, int, int, char*, void* priv) -> int {
      auto* c = static_cast<Ctx*>(priv);
      int len = ext2fs_dirent_name_len(dirent);
      std::string name(dirent->name, size_t(len));
      if (name == "." || name == "..") return 0;
      DirEntry e;
      e.name = std::move(name);
      e.ino = dirent->inode;
      if (c->has_filetype) {
        switch (ext2fs_dirent_file_type(dirent)) {
          case EXT2_FT_REG_FILE: e.type = FileType::Regular; break;
          case EXT2_FT_DIR: e.type = FileType::Directory; break;
          case EXT2_FT_SYMLINK: e.type = FileType::Symlink; break;
          case EXT2_FT_CHRDEV: e.type = FileType::CharDevice; break;
          case EXT2_FT_BLKDEV: e.type = FileType::BlockDevice; break;
          case EXT2_FT_FIFO: e.type = FileType::Fifo; break;
          case EXT2_FT_SOCK: e.type = FileType::Socket; break;
          default: break;
        }
      }
      c->entries.push_back(std::move(e));
      // A hostile directory can claim millions of entries; stop at a bound no real one reaches.
      return c->entries.size() > 10'000'000 ? DIRENT_ABORT : 0;
    };
    errcode_t err = ext2fs_dir_iterate2(fs_, ino, 0, nullptr, callback, &ctx);
    if (err) return ext_error(err, "read directory " + path);
    if (!ctx.has_filetype) {
      for (auto& e : ctx.entries) {
        struct ext2_inode inode;
        if (ext2fs_read_inode(fs_, ext2_ino_t(e.ino), &inode) == 0) e.type = type_of_mode(inode.i_mode);
      }
    }
    return std::move(ctx.entries);
  }

  Result<std::string> readlink(const std::string& path) override {
    ext2_ino_t ino = TRY(lookup(path));
    struct ext2_inode_large inode;
    TRY(read_inode(ino, inode, path));
    if (!LINUX_S_ISLNK(inode.i_mode)) return fail(EINVAL, path + ": not a symbolic link");
    uint64_t size = EXT2_I_SIZE(&inode);
    if (size > fs_->blocksize || size > 65536) return fail(EIO, path + ": symbolic link target is too long");
    if (inode.i_flags & EXT4_INLINE_DATA_FL) {
      std::string target(size_t(size) + 60, '\0');
      size_t got = 0;
      errcode_t err = ext2fs_inline_data_get(fs_, ino, EXT2_INODE(&inode), target.data(), &got);
      if (err) return ext_error(err, "read link " + path);
      target.resize(std::min<size_t>(got, size));
      return target;
    }
    if (ext2fs_is_fast_symlink(EXT2_INODE(&inode))) {
      if (size >= sizeof(inode.i_block)) return fail(EIO, path + ": corrupt fast symlink");
      return std::string(reinterpret_cast<const char*>(inode.i_block), size_t(size));
    }
    std::string target;
    TRY(read(path, 0, size, [&](std::span<const uint8_t> chunk) -> Result<void> {
      target.append(reinterpret_cast<const char*>(chunk.data()), chunk.size());
      return ok();
    }));
    return target;
  }

  Result<void> read(const std::string& path, uint64_t offset, uint64_t length,
                    const std::function<Result<void>(std::span<const uint8_t>)>& sink) override {
    ext2_ino_t ino = TRY(lookup(path));
    ext2_file_t file;
    errcode_t err = ext2fs_file_open(fs_, ino, 0, &file);
    if (err) return ext_error(err, "open " + path);
    std::vector<uint8_t> buffer(std::max<size_t>(fs_->blocksize * 64, 65536));
    Result<void> result = ok();
    __u64 size = EXT2_I_SIZE(ext2fs_file_get_inode(file));
    if (offset < size) {
      length = std::min<uint64_t>(length, size - offset);
      err = ext2fs_file_llseek(file, offset, EXT2_SEEK_SET, nullptr);
      while (!err && length > 0) {
        unsigned int got = 0;
        unsigned int want = unsigned(std::min<uint64_t>(length, buffer.size()));
        err = ext2fs_file_read(file, buffer.data(), want, &got);
        if (err || got == 0) break;
        result = sink(std::span<const uint8_t>(buffer.data(), got));
        if (!result) break;
        length -= got;
      }
    }
    ext2fs_file_close(file);
    if (err) return ext_error(err, "read " + path);
    return result;
  }

  Result<FsStats> statvfs() override {
    FsStats s;
    auto* sb = fs_->super;
    s.block_size = fs_->blocksize;
    uint64_t overhead = sb->s_overhead_clusters;
    if (overhead == 0) overhead = TRY(compute_overhead());
    uint64_t total = ext2fs_blocks_count(sb);
    s.blocks = total > overhead ? total - overhead : 0;
    s.blocks_free = ext2fs_free_blocks_count(sb);
    uint64_t reserved = ext2fs_r_blocks_count(sb);
    // Linux's ext4 also holds back 2% of the clusters (at most 4096) on extent-mapped filesystems
    // so that extent splits never fail: they are not available either.
    if (ext2fs_has_feature_extents(sb)) {
      uint64_t clusters = total >> (sb->s_log_cluster_size - sb->s_log_block_size);
      reserved += std::min<uint64_t>(clusters / 50, 4096) << (sb->s_log_cluster_size - sb->s_log_block_size);
    }
    s.blocks_available = s.blocks_free > reserved ? s.blocks_free - reserved : 0;
    s.files = sb->s_inodes_count;
    s.files_free = sb->s_free_inodes_count;
    s.name_max = 255;
    return s;
  }

  Result<void> write(const std::string& path, std::span<const uint8_t> data, WriteMode mode,
                     uint32_t create_mode) override {
    TRY(check_writable());
    ext2_ino_t ino = 0;
    auto existing = lookup(path);
    if (existing) {
      ino = *existing;
      struct ext2_inode_large inode;
      TRY(read_inode(ino, inode, path));
      if (!LINUX_S_ISREG(inode.i_mode)) return fail(EISDIR, path + ": not a regular file");
    } else {
      ino = TRY(create_node(path, LINUX_S_IFREG | (create_mode & 07777)));
    }
    ext2_file_t file;
    errcode_t err = ext2fs_file_open(fs_, ino, EXT2_FILE_WRITE, &file);
    if (err) return ext_error(err, "open " + path);
    if (mode == WriteMode::Truncate) {
      err = ext2fs_file_set_size2(file, 0);
    } else {
      err = ext2fs_file_llseek(file, 0, EXT2_SEEK_END, nullptr);
    }
    size_t done = 0;
    while (!err && done < data.size()) {
      unsigned int wrote = 0;
      unsigned int want = unsigned(std::min<size_t>(data.size() - done, 1u << 20));
      err = ext2fs_file_write(file, data.data() + done, want, &wrote);
      if (!err && wrote == 0) err = EXT2_ET_SHORT_WRITE;
      done += wrote;
    }
    errcode_t close_err = ext2fs_file_close(file);
    if (err) return ext_error(err, "write " + path);
    if (close_err) return ext_error(close_err, "write " + path);
    TRY(touch_inode(ino, true));
    return ok();
  }

  Result<void> mkdir(const std::string& path, uint32_t mode) override {
    TRY(check_writable());
    ext2_ino_t parent = TRY(lookup(parent_path(path)));
    std::string name = base_name(path);
    if (lookup(path)) return fail(EEXIST, path + ": already exists");
    errcode_t err = ext2fs_mkdir(fs_, parent, 0, name.c_str());
    if (err == EXT2_ET_DIR_NO_SPACE) {
      err = ext2fs_expand_dir(fs_, parent);
      if (!err) err = ext2fs_mkdir(fs_, parent, 0, name.c_str());
    }
    if (err) return ext_error(err, "mkdir " + path);
    ext2_ino_t ino = TRY(lookup(path));
    struct ext2_inode_large inode;
    TRY(read_inode(ino, inode, path));
    inode.i_mode = LINUX_S_IFDIR | (mode & 07777);
    TRY(write_inode(ino, inode, path));
    return ok();
  }

  Result<void> unlink(const std::string& path) override {
    TRY(check_writable());
    ext2_ino_t parent = TRY(lookup(parent_path(path)));
    ext2_ino_t ino = TRY(lookup(path));
    struct ext2_inode_large inode;
    TRY(read_inode(ino, inode, path));
    if (LINUX_S_ISDIR(inode.i_mode)) return fail(EISDIR, path + ": is a directory");
    errcode_t err = ext2fs_unlink(fs_, parent, base_name(path).c_str(), ino, 0);
    if (err) return ext_error(err, "unlink " + path);
    TRY(drop_link(ino, path));
    TRY(touch_inode(parent, true));
    return ok();
  }

  Result<void> rmdir(const std::string& path) override {
    TRY(check_writable());
    if (split_path(path).empty()) return fail(EBUSY, "cannot remove the root directory");
    ext2_ino_t parent = TRY(lookup(parent_path(path)));
    ext2_ino_t ino = TRY(lookup(path));
    struct ext2_inode_large inode;
    TRY(read_inode(ino, inode, path));
    if (!LINUX_S_ISDIR(inode.i_mode)) return fail(ENOTDIR, path + ": not a directory");
    auto entries = TRY(readdir(path));
    if (!entries.empty()) return fail(ENOTEMPTY, path + ": directory not empty");
    errcode_t err = ext2fs_unlink(fs_, parent, base_name(path).c_str(), ino, 0);
    if (err) return ext_error(err, "rmdir " + path);
    TRY(free_inode(ino, inode, path));
    TRY(adjust_links(parent, -1, parent_path(path)));
    return ok();
  }

  Result<void> rename(const std::string& from, const std::string& to) override {
    TRY(check_writable());
    ext2_ino_t ino = TRY(lookup(from));
    ext2_ino_t old_parent = TRY(lookup(parent_path(from)));
    ext2_ino_t new_parent = TRY(lookup(parent_path(to)));
    struct ext2_inode_large inode;
    TRY(read_inode(ino, inode, from));
    bool is_dir = LINUX_S_ISDIR(inode.i_mode);
    if (is_dir) {
      // Refuse to move a directory into itself or below.
      std::string f = from, t = to;
      if (t == f || t.rfind(f + "/", 0) == 0) return fail(EINVAL, "cannot move " + from + " into itself");
    }
    if (auto target = lookup(to)) {
      if (*target == ino) return ok();
      struct ext2_inode_large tinode;
      TRY(read_inode(*target, tinode, to));
      if (LINUX_S_ISDIR(tinode.i_mode)) {
        if (!is_dir) return fail(EISDIR, to + ": is a directory");
        TRY(rmdir(to));
      } else {
        if (is_dir) return fail(ENOTDIR, to + ": not a directory");
        TRY(unlink(to));
      }
    }
    TRY(add_link(new_parent, base_name(to), ino, ext_file_type(inode.i_mode)));
    errcode_t err = ext2fs_unlink(fs_, old_parent, base_name(from).c_str(), ino, 0);
    if (err) return ext_error(err, "rename " + from);
    if (is_dir && old_parent != new_parent) {
      struct DotDot {
        ext2_ino_t new_parent;
      } ctx{new_parent};
      auto fix = [](ext2_ino_t, int, struct ext2_dir_entry* dirent, int, int, char*, void* priv) -> int {
        if (ext2fs_dirent_name_len(dirent) == 2 && dirent->name[0] == '.' && dirent->name[1] == '.') {
          dirent->inode = static_cast<DotDot*>(priv)->new_parent;
          return DIRENT_CHANGED | DIRENT_ABORT;
        }
        return 0;
      };
      err = ext2fs_dir_iterate2(fs_, ino, DIRENT_FLAG_INCLUDE_EMPTY, nullptr, fix, &ctx);
      if (err) return ext_error(err, "rename " + from);
      TRY(adjust_links(old_parent, -1, parent_path(from)));
      TRY(adjust_links(new_parent, +1, parent_path(to)));
    }
    TRY(touch_inode(ino, false));
    return ok();
  }

  Result<void> symlink(const std::string& target, const std::string& path) override {
    TRY(check_writable());
    ext2_ino_t parent = TRY(lookup(parent_path(path)));
    if (lookup(path)) return fail(EEXIST, path + ": already exists");
    std::string name = base_name(path);
    errcode_t err = ext2fs_symlink(fs_, parent, 0, name.c_str(), target.c_str());
    if (err == EXT2_ET_DIR_NO_SPACE) {
      err = ext2fs_expand_dir(fs_, parent);
      if (!err) err = ext2fs_symlink(fs_, parent, 0, name.c_str(), target.c_str());
    }
    if (err) return ext_error(err, "symlink " + path);
    return ok();
  }

  Result<void> chmod(const std::string& path, uint32_t mode) override {
    TRY(check_writable());
    ext2_ino_t ino = TRY(lookup(path));
    struct ext2_inode_large inode;
    TRY(read_inode(ino, inode, path));
    inode.i_mode = uint16_t((inode.i_mode & 0170000) | (mode & 07777));
    inode.i_ctime = uint32_t(time(nullptr));
    return write_inode(ino, inode, path);
  }

  Result<void> chown(const std::string& path, uint32_t uid, uint32_t gid) override {
    TRY(check_writable());
    ext2_ino_t ino = TRY(lookup(path));
    struct ext2_inode_large inode;
    TRY(read_inode(ino, inode, path));
    inode.i_uid = uint16_t(uid);
    inode.osd2.linux2.l_i_uid_high = uint16_t(uid >> 16);
    inode.i_gid = uint16_t(gid);
    inode.osd2.linux2.l_i_gid_high = uint16_t(gid >> 16);
    inode.i_ctime = uint32_t(time(nullptr));
    return write_inode(ino, inode, path);
  }

  Result<void> set_times(const std::string& path, int64_t atime, int64_t mtime) override {
    TRY(check_writable());
    ext2_ino_t ino = TRY(lookup(path));
    struct ext2_inode_large inode;
    TRY(read_inode(ino, inode, path));
    inode.i_atime = uint32_t(atime);
    inode.i_mtime = uint32_t(mtime);
    inode.i_ctime = uint32_t(time(nullptr));
    return write_inode(ino, inode, path);
  }

  Result<void> sync() override {
    if (read_only_) return ok();
    errcode_t err = ext2fs_flush(fs_);
    if (err) return ext_error(err, "flush filesystem");
    return ok();
  }

  // Creates a new inode of `mode` and links it at `path` (parents must exist).
  Result<ext2_ino_t> create_node(const std::string& path, uint32_t mode) {
    ext2_ino_t parent = TRY(lookup(parent_path(path)));
    ext2_ino_t ino = 0;
    errcode_t err = ext2fs_new_inode(fs_, parent, int(mode), nullptr, &ino);
    if (err) return ext_error(err, "allocate an inode for " + path);
    TRY(add_link(parent, base_name(path), ino, ext_file_type(mode)));
    ext2fs_inode_alloc_stats2(fs_, ino, +1, 0);
    struct ext2_inode_large inode;
    std::memset(&inode, 0, sizeof inode);
    inode.i_mode = uint16_t(mode);
    inode.i_links_count = 1;
    uint32_t now = uint32_t(time(nullptr));
    inode.i_atime = inode.i_mtime = inode.i_ctime = now;
    if (EXT2_INODE_SIZE(fs_->super) > EXT2_GOOD_OLD_INODE_SIZE)
      inode.i_extra_isize = sizeof(struct ext2_inode_large) - EXT2_GOOD_OLD_INODE_SIZE;
    if (ext2fs_has_feature_extents(fs_->super)) {
      inode.i_flags |= EXT4_EXTENTS_FL;
      ext2_extent_handle_t handle;
      err = ext2fs_extent_open2(fs_, ino, EXT2_INODE(&inode), &handle);
      if (err) return ext_error(err, "initialise extents of " + path);
      ext2fs_extent_free(handle);
    }
    err = ext2fs_write_new_inode(fs_, ino, EXT2_INODE(&inode));
    if (err) return ext_error(err, "write inode of " + path);
    return ino;
  }

private:
  Result<void> check_writable() {
    if (read_only_) return fail(EROFS, "filesystem is mounted read-only");
    return ok();
  }

  Result<ext2_ino_t> lookup(const std::string& path) {
    ext2_ino_t ino = EXT2_ROOT_INO;
    for (const auto& part : split_path(path)) {
      if (part == "..") return fail(EINVAL, path + ": unexpected '..'");
      ext2_ino_t next = 0;
      errcode_t err = ext2fs_lookup(fs_, ino, part.c_str(), int(part.size()), nullptr, &next);
      if (err == EXT2_ET_FILE_NOT_FOUND) return fail(ENOENT, path + ": No such file or directory");
      if (err == EXT2_ET_NO_DIRECTORY) return fail(ENOTDIR, path + ": Not a directory");
      if (err) return ext_error(err, "look up " + path);
      if (next == 0 || next > fs_->super->s_inodes_count) return fail(EIO, path + ": directory entry has a bad inode number");
      ino = next;
    }
    return ino;
  }

  Result<void> read_inode(ext2_ino_t ino, struct ext2_inode_large& inode, const std::string& path) {
    std::memset(&inode, 0, sizeof inode);
    errcode_t err = ext2fs_read_inode_full(fs_, ino, EXT2_INODE(&inode), sizeof inode);
    if (err) return ext_error(err, "read inode of " + path);
    return ok();
  }

  Result<void> write_inode(ext2_ino_t ino, struct ext2_inode_large& inode, const std::string& path) {
    errcode_t err = ext2fs_write_inode_full(fs_, ino, EXT2_INODE(&inode), sizeof inode);
    if (err) return ext_error(err, "write inode of " + path);
    return ok();
  }

  Result<void> touch_inode(ext2_ino_t ino, bool modified) {
    struct ext2_inode_large inode;
    TRY(read_inode(ino, inode, "inode"));
    uint32_t now = uint32_t(time(nullptr));
    inode.i_ctime = now;
    if (modified) inode.i_mtime = now;
    return write_inode(ino, inode, "inode");
  }

  Result<void> add_link(ext2_ino_t dir, const std::string& name, ext2_ino_t ino, int file_type) {
    errcode_t err = ext2fs_link(fs_, dir, name.c_str(), ino, file_type);
    if (err == EXT2_ET_DIR_NO_SPACE) {
      err = ext2fs_expand_dir(fs_, dir);
      if (!err) err = ext2fs_link(fs_, dir, name.c_str(), ino, file_type);
    }
    if (err) return ext_error(err, "link " + name);
    return ok();
  }

  Result<void> adjust_links(ext2_ino_t ino, int delta, const std::string& path) {
    struct ext2_inode_large inode;
    TRY(read_inode(ino, inode, path));
    // A directory with dir_nlink overflow keeps a count of 1: leave it alone.
    if (LINUX_S_ISDIR(inode.i_mode) && inode.i_links_count <= 1 && delta < 0) return ok();
    if (delta < 0 && inode.i_links_count == 0) return ok();
    inode.i_links_count = uint16_t(int(inode.i_links_count) + delta);
    uint32_t now = uint32_t(time(nullptr));
    inode.i_ctime = inode.i_mtime = now;
    return write_inode(ino, inode, path);
  }

  Result<void> drop_link(ext2_ino_t ino, const std::string& path) {
    struct ext2_inode_large inode;
    TRY(read_inode(ino, inode, path));
    if (inode.i_links_count > 1) {
      inode.i_links_count--;
      inode.i_ctime = uint32_t(time(nullptr));
      return write_inode(ino, inode, path);
    }
    return free_inode(ino, inode, path);
  }

  Result<void> free_inode(ext2_ino_t ino, struct ext2_inode_large& inode, const std::string& path) {
    errcode_t err = 0;
    if (ext2fs_file_acl_block(fs_, EXT2_INODE(&inode))) {
      err = ext2fs_free_ext_attr(fs_, ino, &inode);
      if (err) return ext_error(err, "free extended attributes of " + path);
    }
    if (ext2fs_inode_has_valid_blocks2(fs_, EXT2_INODE(&inode)) || (inode.i_flags & EXT4_INLINE_DATA_FL)) {
      err = ext2fs_punch(fs_, ino, EXT2_INODE(&inode), nullptr, 0, ~0ULL);
      if (err) return ext_error(err, "free blocks of " + path);
    }
    inode.i_links_count = 0;
    inode.i_dtime = uint32_t(time(nullptr));
    TRY(write_inode(ino, inode, path));
    ext2fs_inode_alloc_stats2(fs_, ino, -1, LINUX_S_ISDIR(inode.i_mode) ? 1 : 0);
    return ok();
  }

  Result<uint64_t> compute_overhead() {
    // What Linux's ext4 statfs counts as overhead: superblock and descriptor copies, bitmaps,
    // inode tables and the journal.
    uint64_t overhead = fs_->super->s_first_data_block;
    for (dgrp_t g = 0; g < fs_->group_desc_count; g++) {
      blk64_t super_blk = 0, old_desc = 0, new_desc = 0;
      blk_t used = 0;
      ext2fs_super_and_bgd_loc2(fs_, g, &super_blk, &old_desc, &new_desc, &used);
      overhead += used + 2 + fs_->inode_blocks_per_group;
    }
    if (fs_->super->s_journal_inum) {
      struct ext2_inode inode;
      if (ext2fs_read_inode(fs_, fs_->super->s_journal_inum, &inode) == 0)
        overhead += EXT2_I_SIZE(&inode) / fs_->blocksize;
    }
    return overhead;
  }

  uint32_t owner_uid(const ext2_inode& inode) { return inode.i_uid | (uint32_t(inode.osd2.linux2.l_i_uid_high) << 16); }
  uint32_t owner_gid(const ext2_inode& inode) { return inode.i_gid | (uint32_t(inode.osd2.linux2.l_i_gid_high) << 16); }

  ext2_filsys fs_;
  bool read_only_;
};

}  // namespace

Result<std::unique_ptr<Filesystem>> open_ext_filesystem(disk::BlockDevice& device, bool read_only) {
  static std::once_flag init;
  std::call_once(init, [] { initialize_ext2_error_table(); });
  if (device.read_only()) read_only = true;
  std::string name = fmt::format("{}{}", kChannelPrefix, static_cast<void*>(&device));
  int flags = EXT2_FLAG_64BITS | EXT2_FLAG_SKIP_MMP;
  // Verifying metadata checksums (crc32c in software) is most of the CPU time of a read-only walk.
  // A reader does without them: every structure is still bounds-checked by libext2fs. A writer
  // verifies, so it never builds on metadata that is corrupt.
  if (read_only) flags |= EXT2_FLAG_IGNORE_CSUM_ERRORS;
  if (!read_only) flags |= EXT2_FLAG_RW;
  ext2_filsys fs = nullptr;
  errcode_t err = ext2fs_open2(name.c_str(), nullptr, flags, 0, 0, &keel_io_manager_struct, &fs);
  if (err) return ext_error(err, "open ext filesystem");
  if (!read_only && ext2fs_has_feature_journal_needs_recovery(fs->super)) {
    ext2fs_close_free(&fs);
    return fail(EROFS,
                "ext filesystem's journal needs recovery (the guest was not shut down cleanly): refusing to "
                "write to it; open it read-only (--ro), or boot the guest or run e2fsck on it first");
  }
  if (!read_only && (fs->super->s_feature_incompat & ~EXT2_LIB_FEATURE_INCOMPAT_SUPP ||
                     fs->super->s_feature_ro_compat & ~EXT2_LIB_FEATURE_RO_COMPAT_SUPP)) {
    ext2fs_close_free(&fs);
    return fail(EROFS, "ext filesystem has features libext2fs cannot write");
  }
  // Bitmaps are only needed to allocate; a read-only open skips reading them (large filesystems
  // have many).
  err = read_only ? 0 : ext2fs_read_bitmaps(fs);
  if (err) {
    ext2fs_close_free(&fs);
    return ext_error(err, "read ext bitmaps");
  }
  return std::unique_ptr<Filesystem>(new ExtFilesystem(fs, read_only));
}

}  // namespace keel::guestfs
