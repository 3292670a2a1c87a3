#include "base/unique_fd.h"

#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <thread>

namespace keel {
namespace {

bool fd_is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

TEST(UniqueFd, ClosesOnDestruction) {
  auto pipe = make_pipe().value();
  int raw = pipe.first.get();
  EXPECT_TRUE(fd_is_open(raw));
  pipe.first.reset();
  EXPECT_FALSE(fd_is_open(raw));
}

TEST(UniqueFd, MoveTransfersOwnership) {
  auto pipe = make_pipe().value();
  int raw = pipe.first.get();
  UniqueFd moved = std::move(pipe.first);
  EXPECT_FALSE(pipe.first.valid());
  EXPECT_EQ(moved.get(), raw);
  UniqueFd other;
  other = std::move(moved);
  EXPECT_EQ(other.get(), raw);
  EXPECT_TRUE(fd_is_open(raw));
}

TEST(UniqueFd, OpenIsCloexecAndNamesThePathOnError) {
  auto missing = UniqueFd::open("/nonexistent/keel", O_RDONLY);
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code(), ENOENT);
  EXPECT_NE(missing.error().message().find("/nonexistent/keel"), std::string::npos);

  auto fd = UniqueFd::open("/dev/null", O_RDONLY).value();
  EXPECT_TRUE(::fcntl(fd.get(), F_GETFD) & FD_CLOEXEC);
  auto copy = fd.dup().value();
  EXPECT_NE(copy.get(), fd.get());
  EXPECT_TRUE(::fcntl(copy.get(), F_GETFD) & FD_CLOEXEC);
}

TEST(UniqueFd, ReleaseGivesUpOwnership) {
  auto pipe = make_pipe().value();
  int raw = pipe.second.release();
  EXPECT_FALSE(pipe.second.valid());
  EXPECT_TRUE(fd_is_open(raw));
  ::close(raw);
}

TEST(FileHelpers, WriteAllAndReadFullRoundTrip) {
  auto sockets = make_socketpair().value();
  std::string big(200000, 'k');
  std::thread writer([&] { ASSERT_TRUE(write_all(sockets.first.get(), big.data(), big.size())); sockets.first.reset(); });
  std::string got(big.size() + 10, '\0');
  size_t n = read_full(sockets.second.get(), got.data(), got.size()).value();
  writer.join();
  EXPECT_EQ(n, big.size());
  got.resize(n);
  EXPECT_EQ(got, big);
}

TEST(FileHelpers, PreadPastEndIsAnError) {
  auto dir = std::filesystem::temp_directory_path() / ("keel-ufd-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::string path = (dir / "f").string();
  ASSERT_TRUE(write_file(path, "hello"));
  EXPECT_EQ(read_file(path).value(), "hello");
  auto fd = UniqueFd::open(path, O_RDWR).value();
  char buf[4];
  ASSERT_TRUE(pread_all(fd.get(), buf, 4, 1));
  EXPECT_EQ(std::string(buf, 4), "ello");
  auto past = pread_all(fd.get(), buf, 4, 3);
  ASSERT_FALSE(past);
  EXPECT_EQ(past.error().code(), EIO);
  ASSERT_TRUE(pwrite_all(fd.get(), "XY", 2, 8));
  EXPECT_EQ(read_file(path).value(), std::string("hello\0\0\0XY", 10));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace keel
