#include <gtest/gtest.h>

#include "hostd/network.h"

namespace keel::hostd {
namespace {

// What `keel-switch-ctl port-stats keelbr0` prints: the internal port, a vhost-user guest NIC and a
// port whose name starts like the guest's.
constexpr std::string_view kStats =
    "keelbr0 (LOCAL): rx_packets=3 rx_bytes=250 rx_dropped=0 tx_packets=9 tx_bytes=1200 tx_dropped=0\n"
    "kt1a2b3c4d-0 (1): rx_packets=12 rx_bytes=1534 rx_dropped=0 tx_packets=10 tx_bytes=18446744073709551615 "
    "tx_dropped=2\n"
    "kt1a2b3c4d-05 (2): rx_packets=1 rx_bytes=2 rx_dropped=0 tx_packets=3 tx_bytes=4 tx_dropped=0\n";

TEST(PortStats, FindsThePortByItsWholeName) {
  auto c = parse_port_stats(kStats, "kt1a2b3c4d-0");
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ(c->rx_packets, 12u);
  EXPECT_EQ(c->rx_bytes, 1534u);
  EXPECT_EQ(c->tx_packets, 10u);
  EXPECT_EQ(c->tx_bytes, 18446744073709551615u);
  auto other = parse_port_stats(kStats, "kt1a2b3c4d-05");
  ASSERT_TRUE(other);
  EXPECT_EQ(other->tx_bytes, 4u);
}

TEST(PortStats, MissingOrMalformedGiveErrors) {
  auto missing = parse_port_stats(kStats, "kt1a2b3c4d-1");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code(), ENOENT);
  EXPECT_FALSE(parse_port_stats("", "p"));
  auto truncated = parse_port_stats("p (1): rx_packets=1 rx_bytes=2", "p");
  ASSERT_FALSE(truncated);
  EXPECT_NE(truncated.error().message().find("tx_bytes"), std::string::npos);
  EXPECT_FALSE(parse_port_stats("p (1): rx_packets=x rx_bytes=2 tx_packets=3 tx_bytes=4", "p"));
  EXPECT_FALSE(parse_port_stats("p (1): rx_packets=1 rx_bytes=2 tx_packets=3 tx_bytes=99999999999999999999", "p"));
}

}  // namespace
}  // namespace keel::hostd
