#include <gtest/gtest.h>

#include "hostd/http.h"

namespace keel::hostd {
namespace {

TEST(HttpParse, RequestLineQueryAndHeaders) {
  auto r = parse_request_head("POST /v1/domains/a%20b/start?x=1&y=two+words&flag HTTP/1.1\r\n"
                              "Host: keeld\r\nContent-Length: 5\r\nX-Thing:   padded  ");
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->method, "POST");
  EXPECT_EQ(r->path, "/v1/domains/a b/start");
  EXPECT_EQ(r->query["x"], "1");
  EXPECT_EQ(r->query["y"], "two words");
  EXPECT_EQ(r->query.count("flag"), 1u);
  EXPECT_EQ(r->header("content-length"), "5");
  EXPECT_EQ(r->header("x-thing"), "padded");
}

TEST(HttpParse, RejectsMalformed) {
  for (const char* bad : {"", "GET", "GET /", "GET / HTTP/2.0", "get / HTTP/1.1", "GET nopath HTTP/1.1",
                          "GET / HTTP/1.1\r\nNoColon", "GET / HTTP/1.1\r\n: empty-name"}) {
    EXPECT_FALSE(parse_request_head(bad)) << bad;
  }
  EXPECT_EQ(url_decode("%zz%4"), "%zz%4");
  EXPECT_EQ(url_decode("a%2Fb"), "a/b");
}

// Feeds bytes through a socketpair into read_request.
Result<std::optional<HttpRequest>> feed(const std::string& bytes, std::string& carry) {
  auto pair = make_socketpair();
  EXPECT_TRUE(pair);
  EXPECT_TRUE(write_all(pair->first.get(), bytes.data(), bytes.size()));
  pair->first.reset();
  auto s = make_plain_stream(std::move(pair->second));
  return read_request(*s, carry);
}

TEST(HttpRead, BodiesAndKeepAlive) {
  auto pair = make_socketpair();
  ASSERT_TRUE(pair);
  std::string two = "POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n";
  ASSERT_TRUE(write_all(pair->first.get(), two.data(), two.size()));
  pair->first.reset();
  auto s = make_plain_stream(std::move(pair->second));
  std::string carry;
  auto a = read_request(*s, carry);
  ASSERT_TRUE(a && *a);
  EXPECT_EQ((*a)->body, "abc");
  auto b = read_request(*s, carry);
  ASSERT_TRUE(b && *b);
  EXPECT_EQ((*b)->path, "/b");
  auto eof = read_request(*s, carry);
  ASSERT_TRUE(eof);
  EXPECT_FALSE(*eof);
}

TEST(HttpRead, Limits) {
  std::string carry;
  auto big = feed("POST / HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", carry);
  ASSERT_FALSE(big);
  EXPECT_EQ(big.error().code(), E2BIG);
  carry.clear();
  EXPECT_FALSE(feed("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", carry));
  carry.clear();
  EXPECT_FALSE(feed("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", carry));
  carry.clear();
  EXPECT_FALSE(feed("GET / HTTP/1.1\r\nX: " + std::string(20000, 'a') + "\r\n\r\n", carry));
  carry.clear();
  EXPECT_FALSE(feed("POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort", carry));
}

TEST(WebSocket, AcceptKeyFromRfc6455) {
  EXPECT_EQ(websocket_accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

TEST(WebSocket, FramesRoundTripMaskedAndNot) {
  for (size_t size : {0ul, 5ul, 125ul, 126ul, 65535ul, 65536ul, 200000ul}) {
    for (bool mask : {false, true}) {
      auto pair = make_socketpair();
      ASSERT_TRUE(pair);
      auto a = make_plain_stream(std::move(pair->first));
      auto b = make_plain_stream(std::move(pair->second));
      std::string payload(size, 'x');
      for (size_t i = 0; i < size; ++i) payload[i] = static_cast<char>(i * 7);
      std::thread w([&] { ASSERT_TRUE(ws_write(*a, WsOpcode::Binary, payload, mask)); });
      std::string carry;
      auto f = ws_read(*b, carry);
      w.join();
      ASSERT_TRUE(f && *f);
      EXPECT_EQ((*f)->opcode, WsOpcode::Binary);
      EXPECT_EQ((*f)->payload, payload) << size << " " << mask;
    }
  }
}

TEST(WebSocket, OversizedFrameIsAnError) {
  auto pair = make_socketpair();
  auto a = make_plain_stream(std::move(pair->first));
  auto b = make_plain_stream(std::move(pair->second));
  std::string header("\x82\x7f\x00\x00\x00\x01\x00\x00\x00\x00", 10);  // 4 GiB payload claimed
  ASSERT_TRUE(a->write_all(header));
  std::string carry;
  EXPECT_FALSE(ws_read(*b, carry));
}

TEST(Router, MostLiteralRouteWinsAndMethodsAreChecked) {
  HttpServer s;
  s.route("POST", "/v1/domains/{name}/{action}",
          [](HttpRequest& r) { return HttpResponse::json(200, {{"action", r.params["action"]}}); });
  s.route("POST", "/v1/domains/{name}/disks",
          [](HttpRequest& r) { return HttpResponse::json(201, {{"disk_of", r.params["name"]}}); });
  HttpRequest r;
  r.method = "POST";
  r.path = "/v1/domains/vm/disks";
  auto resp = s.dispatch(r);
  EXPECT_EQ(resp.status, 201);
  EXPECT_EQ(nlohmann::json::parse(resp.body)["disk_of"], "vm");
  r.path = "/v1/domains/vm/start";
  EXPECT_EQ(nlohmann::json::parse(s.dispatch(r).body)["action"], "start");
  r.method = "GET";
  EXPECT_EQ(s.dispatch(r).status, 405);
  r.path = "/nothing";
  EXPECT_EQ(s.dispatch(r).status, 404);
}

TEST(Router, FilterRejectsBeforeHandlers) {
  HttpServer s;
  bool ran = false;
  s.route("GET", "/x", [&](HttpRequest&) {
    ran = true;
    return HttpResponse::json(200, {});
  });
  s.set_filter([](const HttpRequest&, bool tcp) -> std::optional<HttpResponse> {
    if (tcp) return HttpResponse::error(401, "token");
    return std::nullopt;
  });
  HttpRequest r;
  r.method = "GET";
  r.path = "/x";
  EXPECT_EQ(s.dispatch(r, true).status, 401);
  EXPECT_FALSE(ran);
  EXPECT_EQ(s.dispatch(r, false).status, 200);
  EXPECT_TRUE(ran);
}

TEST(ConnectUri, Forms) {
  EXPECT_EQ(parse_connect_uri("unix:/run/keel/keeld.sock")->unix_path, "/run/keel/keeld.sock");
  EXPECT_EQ(parse_connect_uri("unix:///run/k.sock")->unix_path, "/run/k.sock");
  auto t = parse_connect_uri("https://host.example:8443");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->host, "host.example");
  EXPECT_EQ(t->port, 8443);
  EXPECT_EQ(parse_connect_uri("https://[::1]:9")->host, "::1");
  EXPECT_FALSE(parse_connect_uri("http://plain:80"));
  EXPECT_FALSE(parse_connect_uri("unix:"));
  EXPECT_FALSE(parse_connect_uri("https://h:99999999"));
}

}  // namespace
}  // namespace keel::hostd
